//! Global models ready to send: each live job's latest model as wire
//! chunks, shared by every site that pulls it, and the slots that bound how
//! many are served at once.
//!
//! A round's new model goes into the cache once the round is committed
//! ([`ModelCache::install`]), from the very chunks the engine wrote to disk,
//! so the first pull of a round does not read the file back (measured with
//! a 400 MB model: a read into fresh memory was a quarter of the pull).
//! Each job keeps its own entry, so jobs running side by side do not evict
//! each other's models; a job's entry goes when the job ends
//! ([`ModelCache::forget`]). After a restart, or for an older round, a pull
//! reads the file ([`ModelCache::get`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use proto::checkpoint::{self, CheckpointError};
use proto::pb;
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

/// A round, and the job's model after it as chunks ready to send.
type CachedModel = (u32, Arc<Vec<Bytes>>);

/// Model transfers served at once; each holds about one encoded chunk.
const SERVING_AT_ONCE: usize = 32;

impl Default for ModelCache {
    fn default() -> Self {
        ModelCache {
            latest: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(SERVING_AT_ONCE)),
        }
    }
}

impl ModelCache {
    fn latest(&self) -> std::sync::MutexGuard<'_, HashMap<String, CachedModel>> {
        // Each change is one insert or remove: a panic cannot leave an entry half-written.
        self.latest.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The chunks of `job_id`'s model after `round`, read from `path` on a
    /// miss. What is read is kept if `keep` (the job is live) and the job
    /// has no newer model cached.
    pub fn get(&self, job_id: &str, round: u32, path: &Path, keep: bool) -> Result<Arc<Vec<Bytes>>, CheckpointError> {
        // Held while reading, so concurrent pulls of a new model read it once.
        let mut latest = self.latest();
        let cached = latest.get(job_id);
        if let Some((r, chunks)) = cached
            && *r == round
        {
            return Ok(Arc::clone(chunks));
        }
        let newer_cached = cached.is_some_and(|(r, _)| *r > round);
        let chunks = Arc::new(checkpoint::read_chunks(path)?);
        if keep && !newer_cached {
            latest.insert(job_id.to_string(), (round, Arc::clone(&chunks)));
        }
        Ok(chunks)
    }

    /// Makes `chunks`, just written durably and committed as `job_id`'s
    /// model after `round`, the job's cached model.
    pub fn install(&self, job_id: &str, round: u32, chunks: Vec<Bytes>) {
        self.latest().insert(job_id.to_string(), (round, Arc::new(chunks)));
    }

    /// Drops `job_id`'s cached model (the job ended, or its next model is
    /// being made; its files remain).
    pub fn forget(&self, job_id: &str) {
        self.latest().remove(job_id);
    }

    /// Streams `header` and then `chunks`, once one of the serving slots is free.
    pub fn stream(&self, chunks: Arc<Vec<Bytes>>, header: pb::ModelHeader, idle: Duration) -> BoxStream<pb::ModelChunk> {
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
            for chunk in chunks.iter() {
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
