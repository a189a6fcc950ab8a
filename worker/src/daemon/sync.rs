//! The coordinator's mirror of the site's ledger, kept whole for as long
//! as a session lasts (`SyncLedger`): the coordinator's account of what it
//! holds decides what is sent next, so a mirror that missed entries, or
//! holds some the ledger lacks, is found out and sent the ledger again.

use std::time::Duration;

use meridian_wire::pb;
use meridian_wire::pb::worker_service_client::WorkerServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::warn;

use super::Worker;

/// Ledger entries sent in one `SyncLedger` call (about 300 bytes each).
const SYNC_BATCH: usize = 1_000;

/// The pause after a round of mirroring that left nothing to send.
const IN_STEP: Duration = Duration::from_secs(1);
/// The pause after the whole ledger was sent and the mirror still
/// disagrees (it holds entries the site no longer has).
const AT_ODDS: Duration = Duration::from_secs(60);

impl Worker {
    /// Keeps the coordinator's mirror of the ledger whole until `done`:
    /// each second, the entries committed since the mirror's last account
    /// go out (whatever became of the message each was committed for); a
    /// mirror whose account disagrees with the ledger's gets all of it, in
    /// batches of `SYNC_BATCH`. A new session starts from the account its
    /// registration reply carries.
    pub(super) async fn sync_ledger(
        &self,
        client: &mut WorkerServiceClient<Channel>,
        mut mirrored: pb::SyncLedgerResponse,
        done: CancellationToken,
    ) {
        let mut since = self.synced_through(&mirrored);
        let mut pause = IN_STEP;
        loop {
            match self.ledger.head() {
                Ok((count, head)) if (count, head) != (mirrored.count, mirrored.head) => {
                    if let Some(next) = self.send_batch(client, (count, head), &mut mirrored, &mut since).await {
                        pause = next;
                    }
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "cannot read the ledger's head"),
            }
            tokio::select! {
                _ = done.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Sends the entries after `since` (at most `SYNC_BATCH`) to a mirror
    /// behind the ledger's `(count, head)`, and takes the mirror's new
    /// account; the pause before the next batch, or `None` when the call
    /// failed (the pause stands).
    async fn send_batch(
        &self,
        client: &mut WorkerServiceClient<Channel>,
        (count, head): (u64, u64),
        mirrored: &mut pb::SyncLedgerResponse,
        since: &mut u64,
    ) -> Option<Duration> {
        let entries = match self.ledger.entries_after(*since, SYNC_BATCH) {
            Ok(entries) => entries,
            Err(e) => {
                warn!(error = %e, "cannot read the ledger to mirror it");
                Vec::new()
            }
        };
        let reply = match client.sync_ledger(pb::SyncLedgerRequest { entries }).await {
            Ok(reply) => reply.into_inner(),
            Err(e) => {
                warn!(error = %e, "cannot mirror the ledger yet");
                return None;
            }
        };
        let sent_all = *since == 0;
        *mirrored = reply;
        *since = self.synced_through(mirrored);
        // A mirror that still disagrees after the whole ledger (entries the
        // site no longer has) is not sent everything every second.
        let behind = (count, head) != (mirrored.count, mirrored.head);
        Some(if sent_all && *since == 0 && behind && count <= SYNC_BATCH as u64 {
            warn!(
                count,
                head,
                mirrored_count = mirrored.count,
                mirrored_head = mirrored.head,
                "the coordinator's mirror holds entries this ledger lacks"
            );
            AT_ODDS
        } else if behind && *since > 0 {
            // More batches to send: straight on.
            Duration::ZERO
        } else {
            IN_STEP
        })
    }

    /// The sequence number up to which the mirror holds exactly the
    /// ledger's entries (0: send everything).
    fn synced_through(&self, mirrored: &pb::SyncLedgerResponse) -> u64 {
        match self.ledger.count_through(mirrored.head) {
            Ok((count, _)) if count == mirrored.count => mirrored.head,
            _ => 0,
        }
    }
}
