//! Updates that arrive in parts, each over a stream and a connection of its
//! own, kept until the last part is in.
//!
//! A site sends a large update in two parts at once so that each part's
//! TLS and copies run in a pipeline of their own (the pull's reason, in
//! `meridian_worker::download`). Each part's stream is announced here when its
//! header passes ([`UpdateParts::begin`]): at most [`MAX_UPLOAD_PARTS`]
//! per upload, every one with the same header but for its range. Each part
//! is checked as it streams in and written to a parameter file of its own;
//! the update counts only once every value is in: the last part to arrive
//! takes the parts from here ([`UpdateParts::arrive`]), checks the norm
//! bound over all of them, lists them in one parts file
//! (`meridian_store::checkpoint::write_parts`) and records that as the update.
//!
//! An upload that cannot complete is dropped with its files: when one of
//! its parts is refused, when the same site starts another upload of the
//! same update, when its round is no longer open ([`UpdateParts::sweep`]),
//! and once no part of it has streamed or arrived for the keep time given
//! to [`UpdateParts::new`]. A part still streaming keeps its upload: a
//! slow second half is never the reason the first is thrown away. After a
//! restart, parts no update lists are removed (`sweep_orphans`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::admission::MAX_UPLOAD_PARTS;

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

/// Why a part is refused by its upload; the upload is dropped with it.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum PartError {
    /// The upload already has its [`MAX_UPLOAD_PARTS`] parts.
    #[error("upload {upload_id} already has its {max} parts", max = MAX_UPLOAD_PARTS)]
    TooMany {
        /// The upload.
        upload_id: String,
    },
    /// The part's header differs from its upload's first part's.
    #[error("a part of upload {upload_id} whose header differs from its other parts'")]
    HeaderDiffers {
        /// The upload.
        upload_id: String,
    },
    /// The part's upload was dropped while the part streamed in.
    #[error("upload {upload_id} was dropped while this part arrived")]
    Dropped {
        /// The upload.
        upload_id: String,
    },
    /// The part's values overlap another part's already received.
    #[error(
        "part of values {first_value}..{end} overlaps \
         the part of values {other_first_value}..{other_end} already received"
    )]
    Overlap {
        /// Where this part's values start.
        first_value: u64,
        /// Where they end (exclusive).
        end: u64,
        /// Where the other part's values start.
        other_first_value: u64,
        /// Where they end (exclusive).
        other_end: u64,
    },
}

/// A site's update for a job's round: (job, round, site).
pub type UpdateKey<'a> = (&'a str, u32, &'a str);

type Key = (String, u32, String);

fn key((job_id, round, site): UpdateKey<'_>) -> Key {
    (job_id.to_string(), round, site.to_string())
}

/// The parts of each upload in progress.
#[derive(Debug)]
pub struct UpdateParts {
    open: Mutex<HashMap<Key, Upload>>,
    /// How long an upload none of whose parts is streaming is kept after
    /// its last part arrived.
    keep: Duration,
}

#[derive(Debug)]
struct Upload {
    id: String,
    /// What every part's header must share (`admission::upload_identity`).
    header: Vec<u8>,
    /// Parts announced by [`UpdateParts::begin`], at most [`MAX_UPLOAD_PARTS`].
    begun: u32,
    /// Parts whose streams are still open.
    streaming: u32,
    parts: Vec<ReceivedPart>,
    last: Instant,
}

/// A part's stream in progress: while it lives, its upload is kept. Dropped
/// when the stream ends, however it ends.
#[must_use]
pub struct PartStream<'a> {
    parts: &'a UpdateParts,
    key: Key,
    id: String,
}

impl Drop for PartStream<'_> {
    fn drop(&mut self) {
        let mut open = self.parts.open();
        if let Some(upload) = open.get_mut(&self.key)
            && upload.id == self.id
        {
            upload.streaming = upload.streaming.saturating_sub(1);
            upload.last = Instant::now();
        }
    }
}

/// Removes the files of dropped parts, outside the lock: a part of a large
/// update is hundreds of megabytes to unlink.
pub fn remove_files(parts: impl IntoIterator<Item = ReceivedPart>) {
    for part in parts {
        let _ = std::fs::remove_file(&part.path);
    }
}

impl UpdateParts {
    /// Keeps an upload none of whose parts is streaming for `keep` after
    /// its last part arrived.
    pub fn new(keep: Duration) -> Self {
        UpdateParts { open: Mutex::new(HashMap::new()), keep }
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Upload>> {
        // Each change leaves every upload whole: a panic cannot leave one half-recorded.
        meridian_sys::sync::lock(&self.open)
    }

    /// Announces a part's stream of the upload `upload_id` of `update`,
    /// whose header, its range left out, is `header`. Refused: a part
    /// beyond [`MAX_UPLOAD_PARTS`], or one whose header differs from its
    /// upload's first. Another upload of the same update (a site that
    /// started again) replaces the older one.
    pub fn begin(&self, update: UpdateKey<'_>, upload_id: &str, header: Vec<u8>) -> Result<PartStream<'_>, PartError> {
        let key = key(update);
        let mut dropped = self.expired();
        let mut open = self.open();
        if open.get(&key).is_some_and(|u| u.id != upload_id)
            && let Some(older) = open.remove(&key)
        {
            dropped.extend(older.parts);
        }
        let upload = open.entry(key.clone()).or_insert_with(|| Upload {
            id: upload_id.to_string(),
            header: header.clone(),
            begun: 0,
            streaming: 0,
            parts: Vec::new(),
            last: Instant::now(),
        });
        let refused = if upload.begun >= MAX_UPLOAD_PARTS {
            Some(PartError::TooMany { upload_id: upload_id.to_string() })
        } else if upload.header != header {
            Some(PartError::HeaderDiffers { upload_id: upload_id.to_string() })
        } else {
            None
        };
        if let Some(reason) = refused {
            if let Some(upload) = open.remove(&key) {
                dropped.extend(upload.parts);
            }
            drop(open);
            remove_files(dropped);
            return Err(reason);
        }
        upload.begun += 1;
        upload.streaming += 1;
        drop(open);
        remove_files(dropped);
        Ok(PartStream { parts: self, key, id: upload_id.to_string() })
    }

    /// Records the checked `part` whose stream `stream` announced, of an
    /// update of `num_params` values. A part that overlaps one already in is
    /// refused, and its upload dropped (its files with it, this part's
    /// included), as is a part whose upload was dropped meanwhile.
    pub fn arrive(&self, stream: &PartStream<'_>, num_params: u64, part: ReceivedPart) -> Result<Arrival, PartError> {
        let mut open = self.open();
        let Some(upload) = open.get_mut(&stream.key).filter(|u| u.id == stream.id) else {
            drop(open);
            remove_files([part]);
            return Err(PartError::Dropped { upload_id: stream.id.clone() });
        };
        let end = part.first_value + part.value_count;
        let overlap =
            upload.parts.iter().find(|p| part.first_value < p.first_value + p.value_count && p.first_value < end);
        if let Some(other) = overlap {
            let reason = PartError::Overlap {
                first_value: part.first_value,
                end,
                other_first_value: other.first_value,
                other_end: other.first_value + other.value_count,
            };
            let mut dropped = open.remove(&stream.key).map(|u| u.parts).unwrap_or_default();
            dropped.push(part);
            drop(open);
            remove_files(dropped);
            return Err(reason);
        }
        upload.parts.push(part);
        upload.last = Instant::now();
        // Parts within the update that do not overlap: all values are in when their counts add up.
        if upload.parts.iter().map(|p| p.value_count).sum::<u64>() < num_params {
            return Ok(Arrival::Waiting);
        }
        let mut parts = open.remove(&stream.key).map(|u| u.parts).unwrap_or_default();
        parts.sort_by_key(|p| p.first_value);
        Ok(Arrival::Whole(parts))
    }

    /// Drops the upload `stream` belongs to, and its parts' files: one of
    /// its parts was refused.
    pub fn abandon(&self, stream: &PartStream<'_>) {
        let mut open = self.open();
        if open.get(&stream.key).is_some_and(|u| u.id == stream.id)
            && let Some(upload) = open.remove(&stream.key)
        {
            drop(open);
            remove_files(upload.parts);
        }
    }

    /// Drops the uploads for which `still_open(job_id, round)` is false
    /// (their round closed or their job ended), and those kept too long.
    pub fn sweep(&self, still_open: impl Fn(&str, u32) -> bool) {
        let mut dropped = self.expired();
        let mut open = self.open();
        let closed: Vec<Key> = open.keys().filter(|(job, round, _)| !still_open(job, *round)).cloned().collect();
        for key in closed {
            if let Some(upload) = open.remove(&key) {
                dropped.extend(upload.parts);
            }
        }
        drop(open);
        remove_files(dropped);
    }

    /// Removes the uploads none of whose parts is streaming and whose last
    /// part arrived more than the keep time ago, and gives their parts.
    fn expired(&self) -> Vec<ReceivedPart> {
        let now = Instant::now();
        let mut open = self.open();
        let stale: Vec<Key> = open
            .iter()
            .filter(|(_, u)| u.streaming == 0 && now.duration_since(u.last) > self.keep)
            .map(|(k, _)| k.clone())
            .collect();
        stale.into_iter().filter_map(|k| open.remove(&k)).flat_map(|u| u.parts).collect()
    }
}

/// The file name a part of an update is written to: `stem.fromN.bin`.
pub fn part_file(updates: &Path, stem: &str, first_value: u64) -> PathBuf {
    updates.join(format!("{stem}.from{first_value}.bin"))
}

/// Whether `name` is a [`part_file`]'s: it ends in `.from` and digits, then
/// `.bin`. A whole update's name ends in `-`, eight hex digits and `.bin`,
/// whatever its site's name.
fn is_part_file(name: &str) -> bool {
    name.strip_suffix(".bin")
        .and_then(|stem| stem.rsplit_once(".from"))
        .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes, from a job's `updates` directory, the part files that no parts
/// file there lists: parts of uploads that were waiting when the
/// coordinator stopped. Run at start, before any part arrives.
pub fn sweep_orphans(updates: &Path) -> std::io::Result<usize> {
    let Ok(entries) = std::fs::read_dir(updates) else {
        return Ok(0);
    };
    let mut part_files = Vec::new();
    let mut listed = std::collections::HashSet::new();
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if is_part_file(name) {
            part_files.push(path);
        } else if let Ok(Some(parts)) = meridian_store::checkpoint::listed_parts(&path) {
            listed.extend(parts);
        }
    }
    let mut removed = 0;
    for path in part_files {
        if !listed.contains(&path) {
            std::fs::remove_file(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_store::checkpoint;

    fn part(dir: &Path, first_value: u64, values: &[f32]) -> ReceivedPart {
        let path = part_file(dir, "u", first_value);
        checkpoint::write_atomic(&path, values).unwrap();
        ReceivedPart { path, first_value, value_count: values.len() as u64, sum_of_squares: Some(1.0) }
    }

    const UPDATE: UpdateKey<'static> = ("job", 3, "hospital-a");

    fn header() -> Vec<u8> {
        b"header".to_vec()
    }

    #[test]
    fn an_update_is_whole_when_its_last_part_arrives_in_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let parts = UpdateParts::new(Duration::from_secs(60));
        let (a, b) = (part(dir.path(), 0, &[1.0, 2.0]), part(dir.path(), 2, &[3.0]));
        let (first, second) =
            (parts.begin(UPDATE, "u1", header()).unwrap(), parts.begin(UPDATE, "u1", header()).unwrap());
        assert_eq!(parts.arrive(&second, 3, b.clone()), Ok(Arrival::Waiting));
        // Another site's part of the same round is its own upload.
        let other_site = parts.begin(("job", 3, "hospital-b"), "u1", header()).unwrap();
        assert_eq!(parts.arrive(&other_site, 3, part(dir.path(), 7, &[9.0])), Ok(Arrival::Waiting));
        assert_eq!(parts.arrive(&first, 3, a.clone()), Ok(Arrival::Whole(vec![a.clone(), b.clone()])));
        // Handed over whole: its files are the caller's now.
        assert!(a.path.exists() && b.path.exists());
        assert!(parts.open().get(&key(UPDATE)).is_none());
    }

    #[test]
    fn a_third_part_or_a_part_with_another_header_drops_the_upload() {
        let dir = tempfile::tempdir().unwrap();
        let parts = UpdateParts::new(Duration::from_secs(60));
        let a = part(dir.path(), 0, &[1.0]);
        let first = parts.begin(UPDATE, "u1", header()).unwrap();
        parts.arrive(&first, 4, a.clone()).unwrap();
        let _second = parts.begin(UPDATE, "u1", header()).unwrap();
        let err = parts.begin(UPDATE, "u1", header()).err().unwrap();
        assert_eq!(err, PartError::TooMany { upload_id: "u1".to_string() });
        assert!(err.to_string().contains("already has its 2 parts"), "{err}");
        assert!(!a.path.exists());

        let a = part(dir.path(), 0, &[1.0]);
        let first = parts.begin(UPDATE, "u2", header()).unwrap();
        parts.arrive(&first, 4, a.clone()).unwrap();
        let err = parts.begin(UPDATE, "u2", b"other metrics".to_vec()).err().unwrap();
        assert_eq!(err, PartError::HeaderDiffers { upload_id: "u2".to_string() });
        assert!(err.to_string().contains("header differs"), "{err}");
        assert!(!a.path.exists());
        // The upload is gone: a part of it that arrives now is refused, and its file removed.
        let late = part(dir.path(), 1, &[2.0]);
        let err = parts.arrive(&first, 4, late.clone()).unwrap_err();
        assert!(matches!(err, PartError::Dropped { .. }), "{err:?}");
        assert!(err.to_string().contains("dropped"), "{err}");
        assert!(!late.path.exists());
    }

    #[test]
    fn an_overlapping_refused_restarted_closed_or_stale_upload_is_dropped_with_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let parts = UpdateParts::new(Duration::from_secs(60));
        let a = part(dir.path(), 0, &[1.0, 2.0]);
        let (first, second) =
            (parts.begin(UPDATE, "u1", header()).unwrap(), parts.begin(UPDATE, "u1", header()).unwrap());
        assert_eq!(parts.arrive(&first, 4, a.clone()), Ok(Arrival::Waiting));
        let overlapping = part(dir.path(), 1, &[5.0]);
        let err = parts.arrive(&second, 4, overlapping.clone()).unwrap_err();
        assert!(matches!(err, PartError::Overlap { first_value: 1, end: 2, other_first_value: 0, other_end: 2 }));
        assert_eq!(err.to_string(), "part of values 1..2 overlaps the part of values 0..2 already received");
        assert!(!a.path.exists() && !overlapping.path.exists());

        // A part refused on the way in drops the parts already kept.
        let a = part(dir.path(), 0, &[1.0, 2.0]);
        let first = parts.begin(UPDATE, "u2", header()).unwrap();
        parts.arrive(&first, 4, a.clone()).unwrap();
        let second = parts.begin(UPDATE, "u2", header()).unwrap();
        parts.abandon(&second);
        assert!(!a.path.exists());

        // A site that starts again replaces its older upload.
        let old = part(dir.path(), 0, &[1.0, 2.0]);
        let first = parts.begin(UPDATE, "u3", header()).unwrap();
        parts.arrive(&first, 4, old.clone()).unwrap();
        let again = parts.begin(UPDATE, "u4", header()).unwrap();
        assert!(!old.path.exists());
        let new = part(dir.path(), 2, &[3.0, 4.0]);
        assert_eq!(parts.arrive(&again, 4, new.clone()), Ok(Arrival::Waiting));

        // Its round closed: swept.
        parts.sweep(|_, round| round != 3);
        assert!(!new.path.exists());
    }

    #[test]
    fn a_slow_part_keeps_its_upload_past_the_keep_time_and_an_idle_one_goes() {
        let dir = tempfile::tempdir().unwrap();
        let parts = UpdateParts::new(Duration::ZERO);
        let a = part(dir.path(), 0, &[1.0, 2.0]);
        let first = parts.begin(UPDATE, "u1", header()).unwrap();
        let second = parts.begin(UPDATE, "u1", header()).unwrap();
        parts.arrive(&first, 4, a.clone()).unwrap();
        drop(first);
        std::thread::sleep(Duration::from_millis(5));
        // The second part is still streaming: nothing expires.
        parts.sweep(|_, _| true);
        assert!(a.path.exists());
        let b = part(dir.path(), 2, &[3.0, 4.0]);
        assert_eq!(parts.arrive(&second, 4, b.clone()), Ok(Arrival::Whole(vec![a.clone(), b.clone()])));

        // An upload whose streams all ended, past the keep time, goes.
        let c = part(dir.path(), 0, &[1.0]);
        let stream = parts.begin(UPDATE, "u2", header()).unwrap();
        parts.arrive(&stream, 4, c.clone()).unwrap();
        drop(stream);
        std::thread::sleep(Duration::from_millis(5));
        parts.sweep(|_, _| true);
        assert!(!c.path.exists());
    }

    #[test]
    fn parts_no_parts_file_lists_are_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let listed = part(dir.path(), 0, &[1.0]);
        let orphan = part_file(dir.path(), "v", 0);
        checkpoint::write_atomic(&orphan, &[2.0]).unwrap();
        // A whole update of a site whose name looks like a part's.
        let whole = dir.path().join("r0001-a.from1-0badcafe.bin");
        checkpoint::write_atomic(&whole, &[3.0]).unwrap();
        checkpoint::write_parts(&dir.path().join("u.bin"), &[(listed.path.clone(), 1)], "test").unwrap();
        assert_eq!(sweep_orphans(dir.path()).unwrap(), 1);
        assert!(listed.path.exists() && whole.exists() && !orphan.exists());
        assert_eq!(sweep_orphans(&dir.path().join("none")).unwrap(), 0);
    }
}
