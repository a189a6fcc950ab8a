//! Update transfers in flight and when each last made progress.
//!
//! Meridian has one model of time for a round instead of a knob per RPC:
//! a round closes at its deadline, except that a site whose update is still
//! arriving (a chunk within the idle timeout, and after ten seconds at least
//! 1 KiB/s on average) is waited for, and a stream
//! that goes silent for the idle timeout is dropped with that reason. A
//! slow hospital uplink is therefore never mistaken for a dead site, and a
//! dead one never holds a round for longer than the idle timeout.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use meridian_sys::now_ms;

/// Each transfer in flight, by a unique id.
#[derive(Debug, Default)]
pub struct Transfers {
    next_id: AtomicU64,
    entries: Mutex<HashMap<u64, Entry>>,
}

/// One transfer: whose, since when, how much, and when it last moved.
#[derive(Debug)]
struct Entry {
    /// The job (empty while queued, before its header is read).
    job: String,
    site: String,
    started_ms: i64,
    last_ms: i64,
    bytes: u64,
}

/// A transfer counts as moving only if, after its first [`GRACE_MS`], it
/// averages at least this rate: a peer trickling a value per idle timeout
/// cannot hold a round open.
const MIN_BYTES_PER_SEC: u64 = 1024;

/// How long a transfer may take before its average rate is judged.
const GRACE_MS: i64 = 10_000;

/// Removes its transfer from [`Transfers`] when the update stream ends, however it ends.
pub struct TransferGuard<'a> {
    transfers: &'a Transfers,
    id: u64,
}

impl Transfers {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        meridian_sys::sync::lock(&self.entries)
    }

    /// Records that `site` started sending an update for `job_id` (`""`: not known yet).
    pub fn start(&self, job_id: &str, site: &str) -> TransferGuard<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let entry = Entry { job: job_id.to_string(), site: site.to_string(), started_ms: now, last_ms: now, bytes: 0 };
        self.map().insert(id, entry);
        TransferGuard { transfers: self, id }
    }

    /// The sites sending an update for `job_id` that made progress at or
    /// after `since_ms` at no less than [`MIN_BYTES_PER_SEC`] on average;
    /// a transfer queued before its header was read counts for every job.
    pub fn moving(&self, job_id: &str, since_ms: i64) -> Vec<String> {
        let now = now_ms();
        self.map()
            .values()
            .filter(|e| {
                let queued = e.job.is_empty();
                let elapsed = now - e.started_ms;
                let fast_enough = queued || elapsed < GRACE_MS || e.bytes * 1000 >= MIN_BYTES_PER_SEC * elapsed as u64;
                (queued || e.job == job_id) && e.last_ms >= since_ms && fast_enough
            })
            .map(|e| e.site.clone())
            .collect()
    }
}

impl TransferGuard<'_> {
    /// Records that `bytes` more arrived (0: still queued, waiting for a slot).
    pub fn progress(&self, bytes: usize) {
        if let Some(entry) = self.transfers.map().get_mut(&self.id) {
            entry.last_ms = now_ms();
            entry.bytes += bytes as u64;
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
        guard.progress(4096);
        // A second stream of the same site (a retry) does not disturb the first.
        drop(transfers.start("job", "hospital-a"));
        assert_eq!(transfers.moving("job", now_ms() - 1_000), vec!["hospital-a".to_string()]);
        assert!(transfers.moving("other", 0).is_empty());
        assert!(transfers.moving("job", now_ms() + 1_000).is_empty(), "no progress after that instant");
        drop(guard);
        assert!(transfers.moving("job", 0).is_empty());
    }

    #[test]
    fn a_trickle_past_the_grace_period_is_not_moving() {
        let transfers = Transfers::default();
        let slow = transfers.start("job", "hospital-x");
        let fast = transfers.start("job", "hospital-a");
        // Both started 20 s ago; one sent 4 bytes since, the other 40 kB.
        for (guard, bytes) in [(&slow, 4), (&fast, 40_000)] {
            guard.progress(bytes);
            transfers.map().get_mut(&guard.id).unwrap().started_ms -= 20_000;
        }
        assert_eq!(transfers.moving("job", now_ms() - 1_000), vec!["hospital-a".to_string()]);
        // Queued transfers are waiting on the coordinator, not trickling: they count.
        let queued = transfers.start("", "hospital-q");
        transfers.map().get_mut(&queued.id).unwrap().started_ms -= 20_000;
        queued.progress(0);
        let mut moving = transfers.moving("job", now_ms() - 1_000);
        moving.sort();
        assert_eq!(moving, vec!["hospital-a".to_string(), "hospital-q".to_string()]);
    }
}
