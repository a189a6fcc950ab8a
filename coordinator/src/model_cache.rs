//! Global models ready to send: each live job's latest model as wire
//! chunks, shared by every site that pulls it, and the slots that bound how
//! many are served at once.
//!
//! A round's new model goes into the cache once the round is committed
//! ([`ModelCache::install`]), from the very chunks the engine wrote to disk,
//! so the first pull of a round does not read the file back (for a large
//! model, a read into fresh memory was a large share of the pull;
//! `docs/perf-log.md`).
//! Each job keeps its own entry, so jobs running side by side do not evict
//! each other's models; a job's entry goes when the job ends
//! ([`ModelCache::forget`]), and its chunks while a round's step makes the
//! next model from them ([`ModelCache::release`]), so that a large job does
//! not hold two models' chunks at once. After a restart, for an older round,
//! or for a released one, a pull reads the file ([`ModelCache::get`]); only
//! what a live job will serve again is kept.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use meridian_store::checkpoint::{self, CheckpointError};
use meridian_wire::pb;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::BoxStream;

/// The latest model of each live job, encoded as chunks, so that every
/// site pulling it in a round shares one copy: memory O(d) per job, not
/// O(sites · d); and the slots bounding how many model transfers are
/// served at once.
pub struct ModelCache {
    latest: Mutex<HashMap<String, CachedModel>>,
    slots: Arc<Semaphore>,
}

/// A round, and the job's model after it as chunks ready to send (`None`
/// once released: read from the file, and not kept, until a newer round is
/// installed).
type CachedModel = (u32, Option<Arc<Vec<Bytes>>>);

/// Model transfers served at once; each holds about one encoded chunk.
const SERVING_AT_ONCE: usize = 32;

/// The values of a model one pull asks for (`PullModelRequest`'s
/// `first_value` and `value_count`; a count of 0 means to the end). A site
/// pulls a large model in parts over connections of its own, so that the
/// parts' TLS and copies run on both cores at once.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ModelPart {
    pub first_value: u64,
    pub value_count: u64,
}

impl ModelPart {
    /// The indices of the chunks that hold exactly this part's values, or
    /// why there are none: a part starts and ends where a chunk does (or
    /// at the model's end), and lies within the model.
    pub fn chunks(&self, chunks: &[Bytes]) -> Result<std::ops::Range<usize>, String> {
        let total: u64 = chunks.iter().map(|c| c.len() as u64 / 4).sum();
        let end = match self.value_count {
            0 => total,
            n => self.first_value.saturating_add(n),
        };
        if self.first_value > total || end > total || (self.value_count == 0 && self.first_value == total && total > 0)
        {
            return Err(format!(
                "first_value {} and value_count {} reach past the model's {total} values",
                self.first_value, self.value_count
            ));
        }
        let (mut first, mut last) = (None, None);
        let mut at = 0u64;
        for (i, chunk) in chunks.iter().enumerate() {
            if at == self.first_value {
                first = Some(i);
            }
            at += chunk.len() as u64 / 4;
            if at == end {
                last = Some(i + 1);
            }
        }
        if total == 0 {
            return Ok(0..0);
        }
        match (first, last) {
            (Some(first), Some(last)) => Ok(first..last),
            _ => Err(format!(
                "first_value {} and value_count {} do not fall on the model's chunks of {} values",
                self.first_value,
                self.value_count,
                meridian_wire::tensor::CHUNK_VALUES
            )),
        }
    }
}

impl Default for ModelCache {
    fn default() -> Self {
        ModelCache { latest: Mutex::new(HashMap::new()), slots: Arc::new(Semaphore::new(SERVING_AT_ONCE)) }
    }
}

impl ModelCache {
    fn latest(&self) -> std::sync::MutexGuard<'_, HashMap<String, CachedModel>> {
        // Each change is one insert or remove: a panic cannot leave an entry half-written.
        meridian_sys::sync::lock(&self.latest)
    }

    /// The chunks of `job_id`'s model after `round`, read from `path` on a
    /// miss. What is read is kept if `keep` (the job is live) and the cache
    /// holds nothing for this round or a newer one (a released round
    /// included). Reads that are not kept are not shared either: each such
    /// pull reads the file.
    pub fn get(&self, job_id: &str, round: u32, path: &Path, keep: bool) -> Result<Arc<Vec<Bytes>>, CheckpointError> {
        let mut latest = self.latest();
        let cached = latest.get(job_id);
        if let Some((r, Some(chunks))) = cached
            && *r == round
        {
            return Ok(Arc::clone(chunks));
        }
        // A newer model, or this one released: this read is not kept.
        if !keep || cached.is_some_and(|(r, _)| *r >= round) {
            drop(latest);
            return Ok(Arc::new(checkpoint::read_chunks(path)?));
        }
        // Held while reading, so concurrent pulls of a new model read it once.
        let chunks = Arc::new(checkpoint::read_chunks(path)?);
        latest.insert(job_id.to_string(), (round, Some(Arc::clone(&chunks))));
        Ok(chunks)
    }

    /// Makes `chunks`, just written durably and committed as `job_id`'s
    /// model after `round`, the job's cached model.
    pub fn install(&self, job_id: &str, round: u32, chunks: Vec<Bytes>) {
        self.latest().insert(job_id.to_string(), (round, Some(Arc::new(chunks))));
    }

    /// Lets go of `job_id`'s cached model after `round`, whose next model is
    /// being made: until it is installed, pulls of `round` read the file and
    /// do not keep it. A newer cached model stays.
    pub fn release(&self, job_id: &str, round: u32) {
        let mut latest = self.latest();
        match latest.get(job_id) {
            Some((r, _)) if *r > round => {}
            _ => {
                latest.insert(job_id.to_string(), (round, None));
            }
        }
    }

    /// Drops `job_id`'s cached model (the job ended; its files remain).
    pub fn forget(&self, job_id: &str) {
        self.latest().remove(job_id);
    }

    /// Streams `header` and then `chunks[range]`, once one of the serving slots is free.
    pub fn stream(
        &self,
        chunks: Arc<Vec<Bytes>>,
        range: std::ops::Range<usize>,
        header: pb::ModelHeader,
        idle: Duration,
    ) -> BoxStream<pb::ModelChunk> {
        let slots = Arc::clone(&self.slots);
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            // The header goes out at once, so a queued puller is not mistaken for a silent peer.
            let header = pb::ModelChunk { part: Some(pb::model_chunk::Part::Header(header)) };
            if tx.send(Ok(header)).await.is_err() {
                return;
            }
            // gRPC encodes each message into a buffer of its own: bounding the
            // transfers served at once bounds those copies (the rest queue).
            let Ok(_slot) = slots.acquire_owned().await else { return };
            // Each chunk is a reference-counted view of the cached model: a
            // thousand sites pulling at once share one copy. A puller that stops
            // reading for the idle timeout gives its slot up.
            for chunk in &chunks[range] {
                let data = pb::ModelChunk { part: Some(pb::model_chunk::Part::Data(chunk.clone())) };
                match tokio::time::timeout(idle, tx.send(Ok(data))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) | Err(_) => return,
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_is_the_chunks_that_hold_exactly_its_values() {
        // Chunks of 3, 3 and 2 values.
        let chunks: Vec<Bytes> = [12, 12, 8].iter().map(|&n| Bytes::from(vec![0u8; n])).collect();
        let part = |first_value, value_count| ModelPart { first_value, value_count }.chunks(&chunks);
        assert_eq!(part(0, 0), Ok(0..3));
        assert_eq!(part(0, 3), Ok(0..1));
        assert_eq!(part(3, 0), Ok(1..3));
        assert_eq!(part(3, 5), Ok(1..3));
        assert_eq!(part(6, 2), Ok(2..3));
        // Not on a chunk's boundary, or past the end.
        for (first, count) in [(1, 0), (0, 4), (3, 4), (6, 3), (8, 0), (9, 0), (0, 9), (u64::MAX, 2)] {
            assert!(part(first, count).is_err(), "{first}, {count}");
        }
        assert_eq!(ModelPart::default().chunks(&[]), Ok(0..0));
    }

    #[test]
    fn installed_models_are_served_without_reading_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        let a = checkpoint::write_chunks_atomic(&path("a4"), &[1.0, 2.0, 3.0], "test").unwrap();
        let b = checkpoint::write_chunks_atomic(&path("b1"), &[4.0], "test").unwrap();
        let cache = ModelCache::default();
        cache.install("a", 4, a.clone());
        cache.install("b", 1, b.clone());
        std::fs::remove_file(path("a4")).unwrap();
        std::fs::remove_file(path("b1")).unwrap();
        // Two jobs side by side: neither evicts the other.
        assert_eq!(*cache.get("a", 4, &path("a4"), true).unwrap(), a);
        assert_eq!(*cache.get("b", 1, &path("b1"), true).unwrap(), b);
        // Another round is not the cached one: its file is read, and missing.
        assert!(cache.get("a", 5, &path("a5"), true).is_err());
        // A job that ended is forgotten.
        cache.forget("b");
        assert!(cache.get("b", 1, &path("b1"), true).is_err());
    }

    #[test]
    fn a_released_model_is_served_from_its_file_and_not_kept_until_the_next_is_installed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r3");
        let three = checkpoint::write_chunks_atomic(&path, &[3.0], "test").unwrap();
        let cache = ModelCache::default();
        cache.install("job", 3, three.clone());
        cache.release("job", 3);
        // Served from the file, and not kept: once the file is gone, so is the model.
        assert_eq!(*cache.get("job", 3, &path, true).unwrap(), three);
        std::fs::remove_file(&path).unwrap();
        assert!(cache.get("job", 3, &path, true).is_err());
        // The next model is installed and served from memory.
        cache.install("job", 4, vec![Bytes::from_static(b"four")]);
        assert_eq!(*cache.get("job", 4, &dir.path().join("r4"), true).unwrap(), vec![Bytes::from_static(b"four")]);
        // Releasing an older round leaves a newer model cached.
        cache.release("job", 3);
        assert_eq!(*cache.get("job", 4, &dir.path().join("r4"), true).unwrap(), vec![Bytes::from_static(b"four")]);
    }

    #[test]
    fn pulling_an_older_round_keeps_the_latest_cached() {
        let dir = tempfile::tempdir().unwrap();
        let old_path = dir.path().join("r1");
        let new_path = dir.path().join("r2");
        let old = checkpoint::write_chunks_atomic(&old_path, &[1.0], "test").unwrap();
        let new = checkpoint::write_chunks_atomic(&new_path, &[2.0], "test").unwrap();
        let cache = ModelCache::default();
        cache.install("job", 2, new.clone());
        assert_eq!(*cache.get("job", 1, &old_path, true).unwrap(), old);
        std::fs::remove_file(&new_path).unwrap();
        assert_eq!(*cache.get("job", 2, &new_path, true).unwrap(), new);
        // A finished job's model is served, not kept.
        let done = checkpoint::write_chunks_atomic(&dir.path().join("d"), &[3.0], "test").unwrap();
        assert_eq!(*cache.get("done", 5, &dir.path().join("d"), false).unwrap(), done);
        std::fs::remove_file(dir.path().join("d")).unwrap();
        assert!(cache.get("done", 5, &dir.path().join("d"), false).is_err());
    }
}
