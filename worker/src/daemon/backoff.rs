//! How long a worker waits before it connects to the coordinator again.
//!
//! Every site loses its connection at the same moment when the coordinator
//! restarts; sites that waited the same time would all come back at once,
//! and again at each failed try after. So the wait is drawn at random
//! ("full jitter"): uniformly between [`MIN`] and a cap that doubles with
//! each failed try up to [`MAX`]. The sites' tries spread over the whole
//! window, and a coordinator that is down long is tried at most every
//! [`MAX`] by each site.

use std::time::Duration;

use rand::{Rng, RngExt};

/// The shortest wait before a reconnect.
pub(super) const MIN: Duration = Duration::from_millis(250);
/// The longest wait before a reconnect.
pub(super) const MAX: Duration = Duration::from_secs(10);

/// The longest wait before reconnect `attempt` (0: the first try after a
/// session ended): twice [`MIN`], doubled for each try since, at most [`MAX`].
/// It starts above [`MIN`] so that even the first tries are spread.
pub(super) fn cap(attempt: u32) -> Duration {
    // 2^6 · MIN is past MAX already: more doublings change nothing.
    let doublings = attempt.saturating_add(1).min(6);
    MIN.saturating_mul(1 << doublings).min(MAX)
}

/// The wait before reconnect `attempt`: uniformly in [`MIN`, `cap(attempt)`].
pub(super) fn delay(attempt: u32, rng: &mut impl Rng) -> Duration {
    rng.random_range(MIN..=cap(attempt))
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn the_cap_doubles_with_each_attempt_up_to_the_max() {
        let caps: Vec<Duration> = (0..8).map(cap).collect();
        assert_eq!(caps[0], MIN * 2);
        for pair in caps.windows(2) {
            assert!(pair[1] == (pair[0] * 2).min(MAX), "{caps:?}");
        }
        assert_eq!(caps[7], MAX);
        assert_eq!(cap(u32::MAX), MAX);
    }

    #[test]
    fn delays_for_one_attempt_are_spread_over_the_window() {
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in [0, 3, 20] {
            let delays: Vec<Duration> = (0..1_000).map(|_| delay(attempt, &mut rng)).collect();
            let (least, most) = (delays.iter().min().unwrap(), delays.iter().max().unwrap());
            assert!(delays.iter().all(|d| (MIN..=cap(attempt)).contains(d)), "attempt {attempt}");
            // 1,000 uniform draws reach within a tenth of the window of either end.
            let window = cap(attempt) - MIN;
            assert!(
                *least < MIN + window / 10 && *most > cap(attempt) - window / 10,
                "attempt {attempt}: {least:?}..{most:?}"
            );
            let mut distinct = delays.clone();
            distinct.sort();
            distinct.dedup();
            assert!(distinct.len() > 900, "attempt {attempt}: {} distinct delays of 1,000", distinct.len());
        }
    }
}
