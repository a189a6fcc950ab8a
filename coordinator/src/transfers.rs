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

use crate::store::now_ms;

/// `(job, site)` → when the transfer last received a chunk, in ms since the epoch.
#[derive(Debug, Default)]
pub struct Transfers {
    last_progress: Mutex<HashMap<(String, String), i64>>,
}

/// Removes its transfer from [`Transfers`] when the update stream ends, however it ends.
pub struct TransferGuard<'a> {
    transfers: &'a Transfers,
    key: (String, String),
}

impl Transfers {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), i64>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.last_progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `site` started sending an update for `job_id`.
    pub fn start(&self, job_id: &str, site: &str) -> TransferGuard<'_> {
        let key = (job_id.to_string(), site.to_string());
        self.map().insert(key.clone(), now_ms());
        TransferGuard {
            transfers: self,
            key,
        }
    }

    /// Records that a chunk of `site`'s update for `job_id` arrived.
    pub fn progress(&self, job_id: &str, site: &str) {
        if let Some(at) = self.map().get_mut(&(job_id.to_string(), site.to_string())) {
            *at = now_ms();
        }
    }

    /// The sites sending an update for `job_id` that made progress at or
    /// after `since_ms`; a transfer started for job `""` (queued before its
    /// header was read) counts for every job.
    pub fn moving(&self, job_id: &str, since_ms: i64) -> Vec<String> {
        self.map()
            .iter()
            .filter(|((job, _), at)| (job == job_id || job.is_empty()) && **at >= since_ms)
            .map(|((_, site), _)| site.clone())
            .collect()
    }
}

impl Drop for TransferGuard<'_> {
    fn drop(&mut self) {
        self.transfers.map().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transfer_is_moving_until_its_stream_ends() {
        let transfers = Transfers::default();
        let guard = transfers.start("job", "hospital-a");
        transfers.progress("job", "hospital-a");
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
