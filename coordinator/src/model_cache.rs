//! Global models ready to send: the latest one as wire chunks, shared by
//! every site that pulls it, and the slots that bound how many are served
//! at once.
//!
//! A round's new model goes into the cache when the engine writes it
//! ([`ModelCache::install`]), from the very chunks it wrote to disk, so the
//! first pull of a round does not read the file back (measured with a
//! 400 MB model: a read into fresh memory was a quarter of the pull). After
//! a restart, or for another job's model, a pull reads the file
//! ([`ModelCache::get`]).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use proto::checkpoint::{self, CheckpointError};
use proto::pb;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::BoxStream;


/// The model most recently written or pulled, encoded as chunks, so that
/// every site pulling it in a round shares one copy: memory O(d), not
/// O(sites · d); and the slots bounding how many model transfers are served
/// at once.
pub struct ModelCache {
    latest: Mutex<Option<CachedModel>>,
    slots: Arc<Semaphore>,
}

/// A job's id, a round, and its model as chunks ready to send.
type CachedModel = (String, u32, Arc<Vec<Bytes>>);

/// Model transfers served at once; each holds about one encoded chunk.
const SERVING_AT_ONCE: usize = 32;

impl Default for ModelCache {
    fn default() -> Self {
        ModelCache {
            latest: Mutex::new(None),
            slots: Arc::new(Semaphore::new(SERVING_AT_ONCE)),
        }
    }
}

impl ModelCache {
    fn latest(&self) -> std::sync::MutexGuard<'_, Option<CachedModel>> {
        // Replacing the entry is one assignment: a panic cannot leave it half-written.
        self.latest.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The chunks of `job_id`'s model after `round`, read from `path` on a miss.
    pub fn get(&self, job_id: &str, round: u32, path: &Path) -> Result<Arc<Vec<Bytes>>, CheckpointError> {
        // Held while reading, so concurrent pulls of a new model read it once.
        let mut latest = self.latest();
        if let Some((job, r, chunks)) = &*latest
            && job == job_id
            && *r == round
        {
            return Ok(Arc::clone(chunks));
        }
        let chunks = Arc::new(checkpoint::read_chunks(path)?);
        *latest = Some((job_id.to_string(), round, Arc::clone(&chunks)));
        Ok(chunks)
    }

    /// Makes `chunks`, just written durably as `job_id`'s model after
    /// `round`, the cached model.
    pub fn install(&self, job_id: &str, round: u32, chunks: Vec<Bytes>) {
        *self.latest() = Some((job_id.to_string(), round, Arc::new(chunks)));
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
    fn an_installed_model_is_served_without_reading_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.bin");
        let chunks = checkpoint::write_chunks_atomic(&path, &[1.0, 2.0, 3.0], "test").unwrap();
        let cache = ModelCache::default();
        cache.install("job", 4, chunks.clone());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(*cache.get("job", 4, &path).unwrap(), chunks);
        // Another round is not the cached one: its file is read, and missing.
        assert!(cache.get("job", 5, &path).is_err());
    }
}
