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
//! Copying a large update into the page cache was most of the receiving
//! thread's work; handing buffered writes to another thread only moved
//! that copy to the core the sender needs, while writing around the page
//! cache removed it.

use bytes::Bytes;
use meridian_store::checkpoint::{CheckpointError, CheckpointWriter};
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinHandle};

/// Chunks waiting for the writing thread: a few MiB per large update.
const QUEUED_CHUNKS: usize = 4;

/// Why an update's file could not be written or committed.
#[derive(Debug, thiserror::Error)]
pub enum UpdateFileError {
    /// Writing or committing the file failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The writing thread ended before every chunk was handed to it, without saying why.
    #[error("the update's writing thread stopped early")]
    StoppedEarly,
    /// The writing thread panicked or was cancelled.
    #[error("the update's writing thread failed: {0}")]
    Writer(JoinError),
    /// The thread committing the file panicked or was cancelled.
    #[error("committing the update failed: {0}")]
    Commit(JoinError),
}

/// An update's file while its values arrive.
pub enum UpdateFile {
    /// Written on the receiving task.
    Inline(CheckpointWriter),
    /// Written by a blocking thread fed through a channel.
    Background { chunks: mpsc::Sender<Bytes>, writer: JoinHandle<Result<CheckpointWriter, CheckpointError>> },
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
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), UpdateFileError> {
        match self {
            UpdateFile::Inline(file) => Ok(file.write_le_bytes(&chunk)?),
            UpdateFile::Background { chunks, writer } => match chunks.send(chunk).await {
                Ok(()) => Ok(()),
                // The writing thread stopped early: it failed, and says why.
                Err(_) => match writer.await {
                    Ok(Err(e)) => Err(e.into()),
                    Ok(Ok(_)) => Err(UpdateFileError::StoppedEarly),
                    Err(e) => Err(UpdateFileError::Writer(e)),
                },
            },
        }
    }

    /// Waits until every chunk is written, then commits the file (see
    /// [`CheckpointWriter::commit`]), from the writing thread's side for a
    /// file whose writes wait for the disk.
    pub async fn commit(self, failpoint: &'static str) -> Result<(), UpdateFileError> {
        match self {
            UpdateFile::Inline(file) => Ok(file.commit(failpoint)?),
            UpdateFile::Background { chunks, writer } => {
                drop(chunks);
                let file = writer.await.map_err(UpdateFileError::Writer)??;
                let committed = tokio::task::spawn_blocking(move || file.commit(failpoint)).await;
                Ok(committed.map_err(UpdateFileError::Commit)??)
            }
        }
    }
}
