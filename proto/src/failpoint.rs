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
//! This is how `cli/tests/it/crash.rs` kills the coordinator at each phase
//! of a round deterministically rather than at random times, which would
//! mostly land while it is idle.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable naming the point to crash at.
pub const ENV: &str = "MERIDIAN_FAILPOINT";

/// The armed point, parsed once: its name and the hit that kills.
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
pub fn hit(name: &str) {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let Some((armed, nth)) = armed() else { return };
    if armed != name {
        return;
    }
    if HITS.fetch_add(1, Ordering::SeqCst) + 1 == *nth {
        eprintln!("{ENV}: killing this process at {name} (hit {nth})");
        kill_self();
    }
}

#[cfg(unix)]
#[allow(unsafe_code)]
fn kill_self() {
    // SAFETY: getpid and kill have no preconditions; SIGKILL does not return.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort();
}

#[cfg(not(unix))]
fn kill_self() {
    std::process::abort();
}
