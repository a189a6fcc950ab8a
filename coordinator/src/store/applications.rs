//! Data-use applications as the coordinator keeps them: the validated spec
//! as canonical JSON beside its hash, who submitted it and when, and every
//! steward's signed decision on it. The hash is stored, not recomputed on
//! read, so that a row whose JSON was altered on disk is caught as corrupt
//! rather than silently given a new identity; a decision is kept with its
//! certificate and signature, so anyone can verify it again.

use meridian_spec::application::ApplicationSpec;
use meridian_spec::decision::SiteDecision;
use rusqlite::{Connection, OptionalExtension, params};

use super::{Result, Store, StoreError};

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS applications (
    id TEXT PRIMARY KEY,
    spec_json TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    requester TEXT NOT NULL,
    submitted_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS application_decisions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    application_id TEXT NOT NULL,
    site TEXT NOT NULL,
    decision_json TEXT NOT NULL,
    steward_cert_pem BLOB NOT NULL,
    signature BLOB NOT NULL
);
"#;

/// A recorded decision: the decision and what proves it.
#[derive(Clone, Debug, PartialEq)]
pub struct DecisionRow {
    /// The decision.
    pub decision: SiteDecision,
    /// Its canonical JSON, as signed.
    pub decision_json: String,
    /// The steward's certificate (PEM).
    pub steward_cert_pem: Vec<u8>,
    /// The steward's signature over `decision_json`.
    pub signature: Vec<u8>,
}

/// One submitted application.
#[derive(Clone, Debug, PartialEq)]
pub struct ApplicationRow {
    /// `app-` and eight hex digits.
    pub id: String,
    /// The validated spec.
    pub spec: ApplicationSpec,
    /// SHA-256 of the spec's canonical JSON.
    pub spec_hash: String,
    /// The certificate name of the scientist who submitted it.
    pub requester: String,
    /// When it was submitted, ms since the Unix epoch.
    pub submitted_at_ms: i64,
}

/// The columns a row is read from, in [`row`]'s order.
const COLUMNS: &str = "id, spec_json, spec_hash, requester, submitted_at_ms";

type RawRow = (String, String, String, String, i64);

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn finish((id, json, spec_hash, requester, submitted_at_ms): RawRow) -> Result<ApplicationRow> {
    let corrupt = |detail: String| StoreError::Corrupt { table: "applications", detail };
    let spec = ApplicationSpec::from_canonical_json(&json, "stored application").map_err(|e| corrupt(e.to_string()))?;
    if spec.hash() != spec_hash {
        return Err(corrupt(format!("application {id}: its spec no longer hashes to {spec_hash}")));
    }
    Ok(ApplicationRow { id, spec, spec_hash, requester, submitted_at_ms })
}

impl Store {
    /// Records a new application; false if its id is taken.
    pub fn insert_application(&self, app: &ApplicationRow) -> Result<bool> {
        self.with(|c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO applications (id, spec_json, spec_hash, requester, submitted_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![app.id, app.spec.canonical_json(), app.spec_hash, app.requester, app.submitted_at_ms],
            )?;
            Ok(n == 1)
        })
    }

    /// One application by id.
    pub fn application(&self, id: &str) -> Result<Option<ApplicationRow>> {
        let raw = self.with(|c| Ok(select_one(c, id)?))?;
        raw.map(finish).transpose()
    }

    /// Records `row` if `check` allows it after the application's earlier
    /// decisions, read under the same lock, so two decisions sent at once
    /// for one site cannot both pass the check.
    pub fn record_decision<E: From<StoreError>>(
        &self,
        row: &DecisionRow,
        check: impl FnOnce(&[DecisionRow]) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        self.with(|c| {
            let tx = c.transaction()?;
            let past = select_decisions(&tx, &row.decision.application_id)?;
            if let Err(refused) = check(&past) {
                return Ok(Err(refused));
            }
            tx.execute(
                "INSERT INTO application_decisions (application_id, site, decision_json, steward_cert_pem, signature)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    row.decision.application_id,
                    row.decision.site,
                    row.decision_json,
                    row.steward_cert_pem,
                    row.signature
                ],
            )?;
            tx.commit()?;
            Ok(Ok(()))
        })?
    }

    /// Every decision on an application, oldest first.
    pub fn decisions(&self, application_id: &str) -> Result<Vec<DecisionRow>> {
        self.with(|c| select_decisions(c, application_id))
    }

    /// Every application, newest first.
    pub fn applications(&self) -> Result<Vec<ApplicationRow>> {
        let raws = self.with(|c| {
            let sql = format!("SELECT {COLUMNS} FROM applications ORDER BY submitted_at_ms DESC, id");
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map([], row)?.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        raws.into_iter().map(finish).collect()
    }
}

/// The decisions on `application_id`, each checked against its own row: a
/// decision whose text was altered on disk is corrupt, not a new decision.
fn select_decisions(c: &Connection, application_id: &str) -> Result<Vec<DecisionRow>> {
    let mut stmt = c.prepare(
        "SELECT application_id, site, decision_json, steward_cert_pem, signature FROM application_decisions
         WHERE application_id = ?1 ORDER BY seq",
    )?;
    let raws = stmt
        .query_map(params![application_id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get(3)?, r.get(4)?))
        })?
        .collect::<rusqlite::Result<Vec<(String, String, String, Vec<u8>, Vec<u8>)>>>()?;
    raws.into_iter()
        .map(|(id, site, decision_json, steward_cert_pem, signature)| {
            let corrupt = |detail: String| StoreError::Corrupt { table: "application_decisions", detail };
            let decision: SiteDecision = serde_json::from_str(&decision_json).map_err(|e| corrupt(e.to_string()))?;
            if decision.canonical_json() != decision_json || decision.application_id != id || decision.site != site {
                return Err(corrupt(format!("a decision on {id} for {site} is not the one recorded")));
            }
            Ok(DecisionRow { decision, decision_json, steward_cert_pem, signature })
        })
        .collect()
}

fn select_one(c: &Connection, id: &str) -> rusqlite::Result<Option<RawRow>> {
    c.query_row(&format!("SELECT {COLUMNS} FROM applications WHERE id = ?1"), params![id], row).optional()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BRFSS: &str = include_str!("../../../examples/applications/brfss.toml");

    fn row(id: &str, at: i64) -> ApplicationRow {
        let spec = ApplicationSpec::from_toml(BRFSS, "brfss.toml").unwrap();
        ApplicationRow { id: id.into(), spec_hash: spec.hash(), spec, requester: "alice".into(), submitted_at_ms: at }
    }

    #[test]
    fn applications_round_trip_newest_first_and_ids_are_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("c.sqlite")).unwrap();
        assert!(store.insert_application(&row("app-1", 10)).unwrap());
        assert!(store.insert_application(&row("app-2", 20)).unwrap());
        assert!(!store.insert_application(&row("app-1", 30)).unwrap());
        assert_eq!(store.application("app-1").unwrap(), Some(row("app-1", 10)));
        assert_eq!(store.application("app-9").unwrap(), None);
        let ids: Vec<String> = store.applications().unwrap().into_iter().map(|a| a.id).collect();
        assert_eq!(ids, ["app-2", "app-1"]);
        // A spec altered on disk is corrupt, not a new application.
        store
            .with(|c| {
                c.execute(
                    "UPDATE applications SET spec_json = replace(spec_json, '4.0', '40.0') WHERE id = 'app-1'",
                    [],
                )?;
                Ok(())
            })
            .unwrap();
        let err = store.application("app-1").unwrap_err().to_string();
        assert!(err.contains("no longer hashes"), "{err}");
    }
}
