//! Where Meridian meets the operating system: every call outside the CPU
//! kernels that Rust cannot check, and the one way each daemon uses a few
//! primitives of `std`. Each `unsafe` block of the workspace but those in
//! `meridian-models`' GEMM lives here, behind a safe function whose
//! contract the block's `SAFETY` comment argues. Where `rustix` offers a
//! safe form of a system call it is used.
//!
//! # Brief overview
//! - [`copy`]: copying large vectors in with non-temporal stores, checking
//!   finiteness on the way, and filling a vector in parts without zeroing it.
//! - [`file`](mod@file): direct I/O, early write-back, page-cache advice.
//! - [`memory`]: huge-page advice and allocator thresholds.
//! - [`failpoint`]: named crash points for fault-injection tests, armed only
//!   with the `failpoints` feature.
//! - [`process`]: children that die with their parent.
//! - [`sync`]: a lock that outlives a panicked holder.
//! - [`now_ms`]: the time as every database and log of Meridian records it.

pub mod copy;
pub mod failpoint;
pub mod file;
pub mod memory;
pub mod process;
pub mod sync;

/// Milliseconds since the Unix epoch (0 on a clock set before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
