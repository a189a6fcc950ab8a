//! Named crash points for fault-injection tests.
//!
//! A daemon calls [`hit`] at the moments where a crash matters most: while
//! assigning a round, while an update streams in, after an update is
//! stored but before it is acknowledged, while aggregating, between writing
//! a checkpoint and renaming it into place, and before the round's commit.
//! Normally `hit` is a load of a static and a comparison. When the
//! environment variable `MERIDIAN_FAILPOINT` is `NAME` or `NAME:N`, the
//! process sends itself SIGKILL the `N`th time (default the first) it
//! reaches the point called `NAME`: no destructor, flush or `atexit` handler
//! runs, exactly as if an operator had run `kill -9` at that instant.
//!
//! Only a build with the `failpoints` feature (the tests' build) reads the
//! variable; in any other build `hit` is empty, so a released binary ignores
//! it.
//!
//! This is how `cli/tests/it/crash.rs` kills the coordinator at each phase
//! of a round deterministically rather than at random times, which would
//! mostly land while it is idle.

#[cfg(feature = "failpoints")]
use std::sync::OnceLock;
#[cfg(feature = "failpoints")]
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable naming the point to crash at.
pub const ENV: &str = "MERIDIAN_FAILPOINT";

/// The armed point, parsed once: its name and the hit that kills.
#[cfg(feature = "failpoints")]
fn armed() -> Option<&'static (String, u64)> {
    static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let value = std::env::var(ENV).ok()?;
            let (name, nth) = match value.split_once(':') {
                Some((name, n)) => (name, n.trim().parse().ok()?),
                None => (value.as_str(), 1),
            };
            Some((name.trim().to_string(), nth))
        })
        .as_ref()
}

/// Marks the point `name`; kills the process here if it is the armed point
/// and this is the armed hit.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let Some((armed, nth)) = armed() else { return };
    if armed != name {
        return;
    }
    if HITS.fetch_add(1, Ordering::SeqCst) + 1 == *nth {
        eprintln!("{ENV}: killing this process at {name} (hit {nth})");
        // SIGKILL does not return; abort in case the signal was refused.
        let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        std::process::abort();
    }
}

/// Marks the point `name`: nothing, in a build without failpoints.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(name: &str) {
    let _ = name;
}
