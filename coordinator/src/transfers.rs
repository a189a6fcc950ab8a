//! Update transfers in flight and when each last made progress.
//!
//! Meridian has one model of time for a round instead of a knob per RPC:
//! a round closes at its deadline, except that a site whose update is still
//! arriving (a chunk within the idle timeout) is waited for, and a stream
//! that goes silent for the idle timeout is dropped with that reason. A
//! slow hospital uplink is therefore never mistaken for a dead site, and a
//! dead one never holds a round for longer than the idle timeout.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::now_ms;

/// Each transfer in flight, by a unique id: its job (empty while queued
/// before its header is read), its site, and when it last made progress.
#[derive(Debug, Default)]
pub struct Transfers {
    next_id: AtomicU64,
    last_progress: Mutex<HashMap<u64, (String, String, i64)>>,
}

/// Removes its transfer from [`Transfers`] when the update stream ends, however it ends.
pub struct TransferGuard<'a> {
    transfers: &'a Transfers,
    id: u64,
}

impl Transfers {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (String, String, i64)>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.last_progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `site` started sending an update for `job_id` (`""`: not known yet).
    pub fn start(&self, job_id: &str, site: &str) -> TransferGuard<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.map()
            .insert(id, (job_id.to_string(), site.to_string(), now_ms()));
        TransferGuard {
            transfers: self,
            id,
        }
    }

    /// The sites sending an update for `job_id` that made progress at or
    /// after `since_ms`; a transfer queued before its header was read counts
    /// for every job.
    pub fn moving(&self, job_id: &str, since_ms: i64) -> Vec<String> {
        self.map()
            .values()
            .filter(|(job, _, at)| (job == job_id || job.is_empty()) && *at >= since_ms)
            .map(|(_, site, _)| site.clone())
            .collect()
    }
}

impl TransferGuard<'_> {
    /// Records that the transfer made progress (a chunk arrived, or it is still queued).
    pub fn progress(&self) {
        if let Some(entry) = self.transfers.map().get_mut(&self.id) {
            entry.2 = now_ms();
        }
    }
}

impl Drop for TransferGuard<'_> {
    fn drop(&mut self) {
        self.transfers.map().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transfer_is_moving_until_its_stream_ends() {
        let transfers = Transfers::default();
        let guard = transfers.start("job", "hospital-a");
        guard.progress();
        // A second stream of the same site (a retry) does not disturb the first.
        drop(transfers.start("job", "hospital-a"));
        assert_eq!(
            transfers.moving("job", now_ms() - 1_000),
            vec!["hospital-a".to_string()]
        );
        assert!(transfers.moving("other", 0).is_empty());
        assert!(
            transfers.moving("job", now_ms() + 1_000).is_empty(),
            "no progress after that instant"
        );
        drop(guard);
        assert!(transfers.moving("job", 0).is_empty());
    }
}
