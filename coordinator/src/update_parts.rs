//! Updates that arrive in parts, each over a stream and a connection of its
//! own, kept until the last part is in.
//!
//! A site sends a large update in two parts at once so that each part's
//! TLS and copies run in a pipeline of their own (the pull's reason, in
//! `worker::download`). Each part is checked as it streams in and written
//! to a parameter file of its own; the update counts only once every value
//! is in: the last part to arrive takes the parts from here, checks the
//! norm bound over all of them, lists them in one parts file
//! (`proto::checkpoint::write_parts`) and records that as the update.
//!
//! Parts of an upload that never completes (a part was refused, its stream
//! broke, the site gave up and started again) are removed with their files:
//! when a part of the same upload is refused, when the same site starts
//! another upload for the same round, or once they have waited longer than
//! [`UpdateParts::new`]'s bound.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use proto::checkpoint;

/// One part on disk, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedPart {
    /// Its parameter file, committed.
    pub path: PathBuf,
    /// Where its values start in the update.
    pub first_value: u64,
    /// How many values it holds.
    pub value_count: u64,
    /// The sum of its values' squares, where the job bounds the norm.
    pub sum_of_squares: Option<f64>,
}

/// What the arrival of a part completed.
#[derive(Debug, PartialEq)]
pub enum Arrival {
    /// Other parts are still to come; this one is kept.
    Waiting,
    /// Every value is in: the parts in order, no longer kept here.
    Whole(Vec<ReceivedPart>),
}

/// A site's update for a job's round: (job, round, site).
type Key = (String, u32, String);

/// The parts of each upload in progress.
#[derive(Debug)]
pub struct UpdateParts {
    open: Mutex<HashMap<Key, Upload>>,
    /// How long an incomplete upload is kept after its last part arrived.
    keep: Duration,
}

#[derive(Debug)]
struct Upload {
    id: String,
    parts: Vec<ReceivedPart>,
    last: Instant,
}

impl Upload {
    fn remove_files(self) {
        for part in self.parts {
            let _ = checkpoint::remove(&part.path);
        }
    }
}

impl UpdateParts {
    /// Keeps an incomplete upload's parts for `keep` after the last one arrived.
    pub fn new(keep: Duration) -> Self {
        UpdateParts {
            open: Mutex::new(HashMap::new()),
            keep,
        }
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Upload>> {
        // Each change is one insert or remove: a panic cannot leave an upload half-recorded.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `part` of the upload `upload_id` of `site`'s update for
    /// `job_id`'s `round`, whose whole has `num_params` values. A part that
    /// overlaps one already in is refused, and its upload dropped (its
    /// files with it, this part's included). Another upload of the same
    /// update, from a site that started again, replaces the older one.
    pub fn arrive(
        &self,
        (job_id, round, site): (&str, u32, &str),
        upload_id: &str,
        num_params: u64,
        part: ReceivedPart,
    ) -> Result<Arrival, String> {
        let key = (job_id.to_string(), round, site.to_string());
        let now = Instant::now();
        let mut open = self.open();
        let stale: Vec<Key> = open
            .iter()
            .filter(|(_, u)| now.duration_since(u.last) > self.keep)
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            if let Some(upload) = open.remove(&key) {
                upload.remove_files();
            }
        }
        if open.get(&key).is_some_and(|u| u.id != upload_id)
            && let Some(older) = open.remove(&key)
        {
            older.remove_files();
        }
        let upload = open.entry(key.clone()).or_insert_with(|| Upload {
            id: upload_id.to_string(),
            parts: Vec::new(),
            last: now,
        });
        let end = part.first_value + part.value_count;
        let overlap = upload
            .parts
            .iter()
            .find(|p| part.first_value < p.first_value + p.value_count && p.first_value < end);
        if let Some(other) = overlap {
            let reason = format!(
                "part of values {}..{} overlaps the part of values {}..{} already received",
                part.first_value,
                end,
                other.first_value,
                other.first_value + other.value_count
            );
            if let Some(upload) = open.remove(&key) {
                upload.remove_files();
            }
            let _ = checkpoint::remove(&part.path);
            return Err(reason);
        }
        upload.parts.push(part);
        upload.last = now;
        // Parts within the update that do not overlap: all values are in when their counts add up.
        if upload.parts.iter().map(|p| p.value_count).sum::<u64>() < num_params {
            return Ok(Arrival::Waiting);
        }
        let mut parts = open.remove(&key).map(|u| u.parts).unwrap_or_default();
        parts.sort_by_key(|p| p.first_value);
        Ok(Arrival::Whole(parts))
    }

    /// Drops the upload `upload_id` of `site`'s update for `job_id`'s
    /// `round`, and its parts' files: one of its parts was refused.
    pub fn abandon(&self, (job_id, round, site): (&str, u32, &str), upload_id: &str) {
        let key = (job_id.to_string(), round, site.to_string());
        let mut open = self.open();
        if open.get(&key).is_some_and(|u| u.id == upload_id)
            && let Some(upload) = open.remove(&key)
        {
            upload.remove_files();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(dir: &std::path::Path, first_value: u64, values: &[f32]) -> ReceivedPart {
        let path = dir.join(format!("p{first_value}.bin"));
        checkpoint::write_atomic(&path, values).unwrap();
        ReceivedPart {
            path,
            first_value,
            value_count: values.len() as u64,
            sum_of_squares: Some(1.0),
        }
    }

    const UPDATE: (&str, u32, &str) = ("job", 3, "hospital-a");

    #[test]
    fn an_update_is_whole_when_its_last_part_arrives_in_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let parts = UpdateParts::new(Duration::from_secs(60));
        let (a, b) = (
            part(dir.path(), 0, &[1.0, 2.0]),
            part(dir.path(), 2, &[3.0]),
        );
        assert_eq!(
            parts.arrive(UPDATE, "u1", 3, b.clone()),
            Ok(Arrival::Waiting)
        );
        // Another site's part of the same round is its own upload.
        let other = part(dir.path(), 7, &[9.0]);
        assert_eq!(
            parts.arrive(("job", 3, "hospital-b"), "u1", 3, other),
            Ok(Arrival::Waiting)
        );
        assert_eq!(
            parts.arrive(UPDATE, "u1", 3, a.clone()),
            Ok(Arrival::Whole(vec![a.clone(), b.clone()]))
        );
        // Handed over whole: its files are the caller's now.
        assert!(a.path.exists() && b.path.exists());
        assert!(
            parts
                .open()
                .get(&("job".to_string(), 3, "hospital-a".to_string()))
                .is_none()
        );
    }

    #[test]
    fn an_overlapping_refused_restarted_or_stale_upload_is_dropped_with_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let parts = UpdateParts::new(Duration::from_secs(60));
        let a = part(dir.path(), 0, &[1.0, 2.0]);
        assert_eq!(
            parts.arrive(UPDATE, "u1", 4, a.clone()),
            Ok(Arrival::Waiting)
        );
        let overlapping = part(dir.path(), 1, &[5.0]);
        let err = parts
            .arrive(UPDATE, "u1", 4, overlapping.clone())
            .unwrap_err();
        assert!(err.contains("overlaps the part of values 0..2"), "{err}");
        assert!(!a.path.exists() && !overlapping.path.exists());

        // A part refused on the way in drops the parts already kept.
        let a = part(dir.path(), 0, &[1.0, 2.0]);
        parts.arrive(UPDATE, "u2", 4, a.clone()).unwrap();
        parts.abandon(UPDATE, "another upload");
        assert!(a.path.exists(), "only the named upload is abandoned");
        parts.abandon(UPDATE, "u2");
        assert!(!a.path.exists());

        // A site that starts again replaces its older upload.
        let old = part(dir.path(), 0, &[1.0, 2.0]);
        parts.arrive(UPDATE, "u3", 4, old.clone()).unwrap();
        let new = part(dir.path(), 2, &[3.0, 4.0]);
        assert_eq!(
            parts.arrive(UPDATE, "u4", 4, new.clone()),
            Ok(Arrival::Waiting)
        );
        assert!(!old.path.exists() && new.path.exists());

        // Parts kept past the bound go when the next part arrives.
        let parts = UpdateParts::new(Duration::ZERO);
        let stale = part(dir.path(), 0, &[1.0, 2.0]);
        parts.arrive(UPDATE, "u5", 4, stale.clone()).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let fresh = part(dir.path(), 0, &[5.0]);
        parts
            .arrive(("job", 4, "hospital-a"), "u6", 2, fresh)
            .unwrap();
        assert!(!stale.path.exists());
    }
}
