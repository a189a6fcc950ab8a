//! The daemons' SQLite databases: opened one way, migrated one way, and the
//! ledger entry read one way from the site's ledger and the coordinator's
//! mirror of it.
//!
//! Both are in WAL mode with `synchronous = FULL`, so a committed
//! transaction survives a `kill -9` or a power loss, and a reader (a `site`
//! command beside the daemon) never blocks the writer. The busy timeout
//! lets a second process wait out the other's transaction instead of
//! failing at once.

use std::path::Path;
use std::time::Duration;

use meridian_spec::mechanism::Mechanism;
use meridian_wire::pb;
use rusqlite::{Connection, Row, params};

/// How long a statement waits for another process's transaction.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens (creating if needed) the database at `path`, durable as the
/// module docs say.
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

/// Whether `table` has `column`.
pub fn has_column(conn: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        &format!("SELECT EXISTS (SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1)"),
        params![column],
        |r| r.get(0),
    )
}

/// Adds `column` to `table` of a database an earlier version wrote, unless
/// it is there. `ALTER TABLE ADD COLUMN` changes no row, so append-only
/// triggers do not object.
pub fn add_column(conn: &Connection, table: &str, column: &str, declaration: &str) -> rusqlite::Result<()> {
    if !has_column(conn, table, column)? {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {declaration}"))?;
    }
    Ok(())
}

/// The columns of a ledger entry, in the order [`ledger_entry`] reads them:
/// the site's `ledger` table and the coordinator's `ledger_mirror` name
/// them alike.
pub const LEDGER_COLUMNS: &str = "seq, site, dataset, job_id, round, spec_hash, noise_multiplier, sample_rate, \
     clip_norm, steps, delta, epsilon_round, epsilon_job, epsilon_dataset, accountant, conversion, library_version, \
     recorded_at_ms, mechanism";

/// A ledger entry from a row selected as [`LEDGER_COLUMNS`]. A mechanism
/// this version does not know (or a row from before mechanisms, `''`) is
/// left unspecified, so [`pb::LedgerEntry::charged`] infers it by round.
pub fn ledger_entry(r: &Row<'_>) -> rusqlite::Result<pb::LedgerEntry> {
    let mechanism = Mechanism::parse(&r.get::<_, String>(18)?).map_or(0, meridian_wire::convert::mechanism_value);
    Ok(pb::LedgerEntry {
        seq: r.get::<_, i64>(0)? as u64,
        site: r.get(1)?,
        dataset: r.get(2)?,
        job_id: r.get(3)?,
        round: r.get(4)?,
        spec_hash: r.get(5)?,
        noise_multiplier: r.get(6)?,
        sample_rate: r.get(7)?,
        clip_norm: r.get(8)?,
        steps: r.get::<_, i64>(9)? as u64,
        delta: r.get(10)?,
        epsilon_round: r.get(11)?,
        epsilon_job: r.get(12)?,
        epsilon_dataset: r.get(13)?,
        accountant: r.get(14)?,
        conversion: r.get(15)?,
        library_version: r.get(16)?,
        recorded_at_unix_ms: r.get(17)?,
        mechanism,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_column_is_added_once_and_an_entry_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("db.sqlite")).unwrap();
        let columns = LEDGER_COLUMNS.split(", ").map(|c| format!("{c} NOT NULL")).collect::<Vec<_>>();
        conn.execute_batch(&format!("CREATE TABLE ledger ({})", columns.join(", "))).unwrap();
        add_column(&conn, "ledger", "note", "TEXT NOT NULL DEFAULT ''").unwrap();
        add_column(&conn, "ledger", "note", "TEXT NOT NULL DEFAULT ''").unwrap();
        assert!(has_column(&conn, "ledger", "note").unwrap());
        conn.execute(
            "INSERT INTO ledger VALUES (7, 'a', 'heart', 'job', 2, 'h', 1.1, 0.01, 1.0, 30, 1e-5, 0.1, 0.2, 0.3, \
             'rdp', 'improved', '0.1.0', 99, 'evaluation', '')",
            [],
        )
        .unwrap();
        let read = |conn: &Connection| {
            conn.query_row(&format!("SELECT {LEDGER_COLUMNS} FROM ledger"), [], ledger_entry).unwrap()
        };
        let e = read(&conn);
        assert_eq!((e.seq, e.site.as_str(), e.round, e.steps, e.recorded_at_unix_ms), (7, "a", 2, 30, 99));
        assert_eq!((e.noise_multiplier, e.epsilon_dataset, e.charged()), (1.1, 0.3, Mechanism::Evaluation));
        conn.execute("UPDATE ledger SET mechanism = '', round = 0", []).unwrap();
        assert_eq!((read(&conn).mechanism, read(&conn).charged()), (0, Mechanism::JobSize));
    }
}
