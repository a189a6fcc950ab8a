//! The file an arriving update is written to, chunk by chunk.
//!
//! A large update is written around the page cache
//! ([`CheckpointWriter::create_uncached`]), and such writes wait for the
//! disk ([`CheckpointWriter::waits_for_disk`]), so its chunks are handed
//! to a blocking thread of their own (the channel moves them without a
//! copy: they are reference-counted `Bytes`), at most [`QUEUED_CHUNKS`] at
//! a time, and the file is committed there too. The async thread goes back
//! to the network meanwhile. Small updates, which a thousand sites may
//! send at once, go through the page cache where they arrive: a thread
//! each would cost more than it saves.
//!
//! Measured on a 400 MB push (`perf`), the coordinator's side ran on one
//! thread at 89 %, a third of it copying the update into the page cache;
//! handing buffered writes to a thread did not help (the copy moved to the
//! other core, which the sender needs), writing around the page cache did.

use bytes::Bytes;
use proto::checkpoint::{CheckpointError, CheckpointWriter};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Chunks waiting for the writing thread: a few MiB per large update.
const QUEUED_CHUNKS: usize = 4;

/// An update's file while its values arrive.
pub enum UpdateFile {
    /// Written on the receiving task.
    Inline(CheckpointWriter),
    /// Written by a blocking thread fed through a channel.
    Background {
        chunks: mpsc::Sender<Bytes>,
        writer: JoinHandle<Result<CheckpointWriter, CheckpointError>>,
    },
}

impl UpdateFile {
    /// Writes `file` where its chunks arrive, or from a blocking thread if
    /// its writes wait for the disk.
    pub fn new(file: CheckpointWriter) -> UpdateFile {
        if !file.waits_for_disk() {
            return UpdateFile::Inline(file);
        }
        let (chunks, mut queue) = mpsc::channel::<Bytes>(QUEUED_CHUNKS);
        let writer = tokio::task::spawn_blocking(move || {
            let mut file = file;
            while let Some(chunk) = queue.blocking_recv() {
                file.write_le_bytes(&chunk)?;
            }
            Ok(file)
        });
        UpdateFile::Background { chunks, writer }
    }

    /// Appends a checked chunk of values.
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), String> {
        match self {
            UpdateFile::Inline(file) => file.write_le_bytes(&chunk).map_err(|e| e.to_string()),
            UpdateFile::Background { chunks, writer } => match chunks.send(chunk).await {
                Ok(()) => Ok(()),
                // The writing thread stopped early: it failed, and says why.
                Err(_) => match writer.await {
                    Ok(Err(e)) => Err(e.to_string()),
                    Ok(Ok(_)) => Err("the update's writing thread stopped early".to_string()),
                    Err(e) => Err(format!("the update's writing thread failed: {e}")),
                },
            },
        }
    }

    /// Waits until every chunk is written, then commits the file (see
    /// [`CheckpointWriter::commit`]), from the writing thread's side for a
    /// file whose writes wait for the disk.
    pub async fn commit(self, failpoint: &'static str) -> Result<(), String> {
        match self {
            UpdateFile::Inline(file) => file.commit(failpoint).map_err(|e| e.to_string()),
            UpdateFile::Background { chunks, writer } => {
                drop(chunks);
                let file = match writer.await {
                    Ok(written) => written.map_err(|e| e.to_string())?,
                    Err(e) => return Err(format!("the update's writing thread failed: {e}")),
                };
                match tokio::task::spawn_blocking(move || file.commit(failpoint)).await {
                    Ok(committed) => committed.map_err(|e| e.to_string()),
                    Err(e) => Err(format!("committing the update failed: {e}")),
                }
            }
        }
    }
}
