//! Upload leases: the receiving slots (one, or one per part of an update
//! sent in parts) that `ReserveUpload` took for a site and holds until the
//! site's `PushUpdate` streams claim them, or until the lease lapses.
//!
//! # Why
//! A site that opens its upload stream at once sends a whole HTTP/2 window
//! of its update before the coordinator reads a byte; with a thousand sites
//! uploading at the same instant, those windows were most of the
//! coordinator's memory. A site that first waits for a lease, in a call
//! that carries no update, sends its update only once a slot is its own,
//! so at most [`super::RECEIVING_AT_ONCE`] updates are ever in flight.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;

/// Granted leases by id.
#[derive(Default)]
pub struct Leases {
    held: Mutex<HashMap<String, Lease>>,
}

struct Lease {
    site: String,
    slot: OwnedSemaphorePermit,
    expires: Instant,
}

impl Leases {
    /// Holds `slot` (one receiving slot, or one per part of an update sent
    /// in parts) for `site` for `valid`; returns the lease's id. A site
    /// holds one lease at a time: a new one releases its previous slots, so
    /// no site can sit on more than one update's.
    pub fn grant(&self, site: &str, slot: OwnedSemaphorePermit, valid: Duration) -> String {
        let id = format!("{:032x}", rand::random::<u128>());
        let lease = Lease { site: site.to_string(), slot, expires: Instant::now() + valid };
        let mut held = meridian_sys::sync::lock(&self.held);
        let now = Instant::now();
        held.retain(|_, lease| lease.expires > now && lease.site != site);
        held.insert(id.clone(), lease);
        id
    }

    /// A slot leased as `id`, if `site` holds that lease and it has not
    /// lapsed. Another site's lease stays with its holder. A lease of
    /// several slots (an update sent in parts, one stream each) gives one
    /// per claim and lasts until its last is claimed.
    pub fn claim(&self, id: &str, site: &str) -> Option<OwnedSemaphorePermit> {
        let mut held = meridian_sys::sync::lock(&self.held);
        match held.get_mut(id) {
            Some(lease) if lease.site == site => {
                if lease.expires <= Instant::now() {
                    held.remove(id);
                    return None;
                }
                if lease.slot.num_permits() > 1 {
                    return lease.slot.split(1);
                }
                held.remove(id).map(|lease| lease.slot)
            }
            _ => None,
        }
    }

    /// Releases the slots of lapsed leases.
    pub fn purge(&self) {
        let now = Instant::now();
        meridian_sys::sync::lock(&self.held).retain(|_, lease| lease.expires > now);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::Semaphore;

    use super::*;

    #[test]
    fn a_lease_is_claimed_once_by_its_site_and_lapses() {
        let slots = Arc::new(Semaphore::new(2));
        let leases = Leases::default();
        let take = || Arc::clone(&slots).try_acquire_owned().unwrap();
        let id = leases.grant("hospital-a", take(), Duration::from_secs(60));
        assert_eq!(slots.available_permits(), 1);
        assert!(leases.claim(&id, "hospital-b").is_none(), "another site's lease");
        let slot = leases.claim(&id, "hospital-a").expect("its own lease");
        assert!(leases.claim(&id, "hospital-a").is_none(), "claimed twice");
        drop(slot);
        assert_eq!(slots.available_permits(), 2);

        // A lapsed lease gives its slot back, on purge or on a late claim.
        let id = leases.grant("hospital-a", take(), Duration::ZERO);
        assert_eq!(slots.available_permits(), 1);
        leases.purge();
        assert_eq!(slots.available_permits(), 2);
        let id2 = leases.grant("hospital-a", take(), Duration::ZERO);
        assert!(leases.claim(&id2, "hospital-a").is_none());
        assert!(leases.claim(&id, "hospital-a").is_none());
        assert_eq!(slots.available_permits(), 2);

        // One lease per site: a second reservation releases the first slot.
        let first = leases.grant("hospital-a", take(), Duration::from_secs(60));
        let second = leases.grant("hospital-a", take(), Duration::from_secs(60));
        assert_eq!(slots.available_permits(), 1);
        assert!(leases.claim(&first, "hospital-a").is_none());
        assert!(leases.claim(&second, "hospital-a").is_some());
    }

    #[test]
    fn a_lease_of_several_slots_gives_one_per_claim() {
        let slots = Arc::new(Semaphore::new(3));
        let leases = Leases::default();
        let two = Arc::clone(&slots).try_acquire_many_owned(2).unwrap();
        let id = leases.grant("hospital-a", two, Duration::from_secs(60));
        assert!(leases.claim(&id, "hospital-b").is_none());
        let first = leases.claim(&id, "hospital-a").expect("first part");
        assert_eq!(first.num_permits(), 1);
        drop(first);
        assert_eq!(slots.available_permits(), 2);
        let second = leases.claim(&id, "hospital-a").expect("second part");
        assert_eq!(second.num_permits(), 1);
        assert!(leases.claim(&id, "hospital-a").is_none(), "every slot claimed");
        drop(second);
        assert_eq!(slots.available_permits(), 3);
    }
}
