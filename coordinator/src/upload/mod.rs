//! Receiving a site's update, in one place. The two RPCs of an upload end
//! here: `ReserveUpload` in [`reserve`] and `PushUpdate` in [`receive`];
//! the service only authorizes the caller and turns a [`ReceiveError`]
//! into a status.
//!
//! - [`admission`]: the checks every update passes before it is counted.
//! - `leases`: the receiving slots a site reserved before it sends.
//! - `transfers`: updates in flight, so a round waits for a slow upload
//!   that is still making progress and drops a silent one.
//! - `incoming`: the file an arriving update is written to.
//! - `parts`: updates sent in parts, kept until the last part is in.
//! - `receive`: one `PushUpdate` stream, from its header to its stored row.
//!
//! # Why one module
//! What makes receiving an update safe is an order of steps: a slot before
//! a byte is read, the site's charge mirrored before anything can refuse
//! the update, every chunk checked before it is written, the transfer
//! visible to the round until the update's row is stored. Spread over the
//! service and five modules beside it, that order could only be seen by
//! reading them all; here it reads top to bottom in `receive`.

pub mod admission;
mod incoming;
mod leases;
pub(crate) mod parts;
mod receive;
pub(crate) mod transfers;

use std::sync::Arc;
use std::time::Duration;

use meridian_store::checkpoint::CheckpointError;
use meridian_wire::pb;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinError;

pub use self::incoming::UpdateFileError;
pub use self::receive::receive;
use crate::engine::Coordinator;
use crate::store::StoreError;

/// Updates read at once; the rest wait in HTTP/2 flow control. Each holds
/// one chunk (≤ 1 MiB) in memory while it streams to disk.
pub const RECEIVING_AT_ONCE: usize = 16;

/// What the coordinator keeps of the updates on their way in.
pub struct Uploads {
    /// Slots for reading updates: [`RECEIVING_AT_ONCE`] at a time.
    receiving: Arc<Semaphore>,
    /// Slots reserved by sites for their next upload.
    leases: leases::Leases,
    /// Update streams in progress, so a round waits for uploads still moving.
    pub transfers: transfers::Transfers,
    /// The parts of updates sent in parts, until each update is whole.
    pub parts: parts::UpdateParts,
}

/// Why an update could not be received. A refused update is not an error:
/// [`receive`] answers it with its reason.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stream failed under the update (the status it failed with).
    #[error("the update stream failed: {0}")]
    Stream(tonic::Status),
    /// No header arrived within the idle timeout.
    #[error("no update header within the idle timeout")]
    NoHeader,
    /// The stream ended before its first message.
    #[error("empty update stream")]
    Empty,
    /// The first message was not a header.
    #[error("an update stream must start with its header")]
    HeaderNotFirst,
    /// The header names no known job.
    #[error("no job \"{0}\"")]
    NoJob(String),
    /// The sending site does not take part in the job.
    #[error("{site} does not take part in job {job_id}")]
    NotParticipant {
        /// The sending site.
        site: String,
        /// The job its header names.
        job_id: String,
    },
    /// The coordinator is shutting down: no slot will come.
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    /// A parameter file failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The update's own file failed.
    #[error(transparent)]
    File(#[from] UpdateFileError),
    /// The thread listing an update's parts panicked or was cancelled.
    #[error("listing the update's parts failed: {0}")]
    ListingParts(JoinError),
}

impl Uploads {
    /// No upload in flight; an incomplete upload's parts are kept for `keep`
    /// after its last part arrived.
    pub fn new(keep: Duration) -> Self {
        Uploads {
            receiving: Arc::new(Semaphore::new(RECEIVING_AT_ONCE)),
            leases: leases::Leases::default(),
            transfers: transfers::Transfers::default(),
            parts: parts::UpdateParts::new(keep),
        }
    }

    /// `slots` of the coordinator's receiving slots, waited for in turn (the
    /// semaphore is first come, first served). A site waiting here counts as
    /// a transfer in progress for every job, so rounds wait for it; lapsed
    /// leases are released while waiting.
    async fn wait_for_slots(&self, site: &str, slots: u32) -> Result<OwnedSemaphorePermit, ReceiveError> {
        let queued = self.transfers.start("", site);
        let acquire = Arc::clone(&self.receiving).acquire_many_owned(slots);
        tokio::pin!(acquire);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                slot = &mut acquire => return slot.map_err(|_| ReceiveError::ShuttingDown),
                _ = tick.tick() => {
                    queued.progress(0);
                    self.leases.purge();
                }
            }
        }
    }
}

/// `ReserveUpload` for `site`, a participant of the job it names: takes a
/// receiving slot per part (`parts`, at least 1 and at most
/// [`admission::MAX_UPLOAD_PARTS`]) and leases them to the site for the
/// idle timeout, so its `PushUpdate` streams are read as soon as they open.
pub async fn reserve(co: &Coordinator, site: &str, parts: u32) -> Result<pb::ReserveUploadResponse, ReceiveError> {
    // A slot per part, taken at once: sites that each held one slot and
    // waited for a second could hold every slot between them.
    let parts = parts.clamp(1, admission::MAX_UPLOAD_PARTS);
    let slots = co.uploads.wait_for_slots(site, parts).await?;
    let valid_secs = co.idle_timeout_secs;
    let lease = co.uploads.leases.grant(site, slots, Duration::from_secs(valid_secs));
    Ok(pb::ReserveUploadResponse { lease, valid_secs: u32::try_from(valid_secs).unwrap_or(u32::MAX), parts })
}
