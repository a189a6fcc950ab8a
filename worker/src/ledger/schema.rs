//! The site database's tables, and the one-way steps that bring a database
//! written by an earlier version up to them, without losing or changing a
//! committed entry.

use meridian_store::sqlite;
use rusqlite::Connection;

/// The tables, created when missing.
pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    site TEXT NOT NULL,
    dataset TEXT NOT NULL,
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    spec_hash TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    clip_norm REAL NOT NULL,
    steps INTEGER NOT NULL,
    delta REAL NOT NULL,
    epsilon_round REAL NOT NULL,
    epsilon_job REAL NOT NULL,
    epsilon_dataset REAL NOT NULL,
    accountant TEXT NOT NULL,
    conversion TEXT NOT NULL,
    library_version TEXT NOT NULL,
    recorded_at_ms INTEGER NOT NULL,
    mechanism TEXT NOT NULL,
    UNIQUE (dataset, job_id, round, mechanism)
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    dataset TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    accepted INTEGER NOT NULL,
    reason TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    planned_steps INTEGER NOT NULL,
    delta REAL NOT NULL,
    planned_epsilon REAL NOT NULL,
    noisy_examples INTEGER NOT NULL DEFAULT 0,
    active INTEGER NOT NULL,
    decided_at_ms INTEGER NOT NULL,
    code TEXT NOT NULL DEFAULT '',
    plan_json TEXT NOT NULL DEFAULT '',
    projected_epsilon REAL NOT NULL DEFAULT 0,
    submitted_by TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS size_releases (
    dataset TEXT NOT NULL,
    release INTEGER NOT NULL,
    digest TEXT NOT NULL,
    test_fraction REAL NOT NULL,
    split_seed INTEGER NOT NULL,
    exact_train INTEGER NOT NULL,
    exact_test INTEGER NOT NULL,
    train_rows INTEGER NOT NULL,
    test_rows INTEGER NOT NULL,
    noise_scale REAL NOT NULL,
    ledger_seq INTEGER NOT NULL,
    released_at_ms INTEGER NOT NULL,
    PRIMARY KEY (dataset, release)
);
CREATE TABLE IF NOT EXISTS released_values (
    seq INTEGER PRIMARY KEY,
    values_json TEXT NOT NULL
);
"#;

/// The append-only rule, as triggers (dropped with the table they guard).
const TRIGGERS: &str = r#"
CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
"#;

/// Creates what is missing and migrates what an earlier version wrote.
pub(super) fn prepare(conn: &mut Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    sqlite::add_column(conn, "jobs", "code", "TEXT NOT NULL DEFAULT ''")?;
    sqlite::add_column(conn, "jobs", "plan_json", "TEXT NOT NULL DEFAULT ''")?;
    sqlite::add_column(conn, "jobs", "projected_epsilon", "REAL NOT NULL DEFAULT 0")?;
    sqlite::add_column(conn, "jobs", "submitted_by", "TEXT NOT NULL DEFAULT ''")?;
    if !sqlite::has_column(conn, "ledger", "mechanism")? {
        add_mechanisms(conn)?;
    }
    conn.execute_batch(TRIGGERS)
}

/// A ledger from before mechanisms had one entry per (job, round): round 0
/// the job's released size, any other round DP-SGD. Its rows move, seq for
/// seq and value for value, into a table whose uniqueness includes the
/// mechanism, in one transaction (a crash leaves the old table whole).
fn add_mechanisms(conn: &mut Connection) -> rusqlite::Result<()> {
    // Immediate, and checked again inside: the daemon and a `site` command
    // opening an old database at once migrate it once.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if sqlite::has_column(&tx, "ledger", "mechanism")? {
        return Ok(());
    }
    tx.execute_batch(
        r#"
        ALTER TABLE ledger RENAME TO ledger_before_mechanisms;
        DROP TRIGGER IF EXISTS ledger_no_update;
        DROP TRIGGER IF EXISTS ledger_no_delete;
        "#,
    )?;
    tx.execute_batch(SCHEMA)?;
    tx.execute_batch(
        r#"
        INSERT INTO ledger (seq, site, dataset, job_id, round, spec_hash, noise_multiplier, sample_rate, clip_norm, steps,
            delta, epsilon_round, epsilon_job, epsilon_dataset, accountant, conversion, library_version, recorded_at_ms, mechanism)
        SELECT seq, site, dataset, job_id, round, spec_hash, noise_multiplier, sample_rate, clip_norm, steps,
            delta, epsilon_round, epsilon_job, epsilon_dataset, accountant, conversion, library_version, recorded_at_ms,
            CASE WHEN round = 0 THEN 'job_size' ELSE 'dp_sgd' END
        FROM ledger_before_mechanisms ORDER BY seq;
        DROP TABLE ledger_before_mechanisms;
        "#,
    )?;
    tx.commit()
}
