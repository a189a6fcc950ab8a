//! What a daemon keeps on disk: its SQLite database, parameter vectors and
//! the audit log. Each is replaced or appended so that a `kill -9` at any
//! instant leaves the old state or the new, never a mix.
//!
//! # Brief overview
//! - [`checkpoint`]: parameter vectors on disk (global models, received
//!   updates, a worker's outbox), written atomically, read in pieces.
//! - [`audit`]: the hash-chained, append-only audit log of every daemon.
//! - [`atomic`]: the one way a file is replaced: a temporary name, fsync,
//!   rename, directory fsync.
//! - [`sqlite`]: the one way a daemon opens and migrates its database, and
//!   reads a ledger entry from it.

pub mod atomic;
pub mod audit;
pub mod checkpoint;
pub mod sqlite;
