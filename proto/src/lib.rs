//! The contract between Meridian's parties: the gRPC API (`meridian.v1`),
//! the job spec a scientist submits, how tensors are cut into chunks on the
//! wire, and how a certificate names its holder and role.
//!
//! # Brief overview
//! - [`pb`]: generated messages, clients and servers for `meridian.v1`
//!   (built by `build.rs` with protox; no `protoc` is needed).
//! - [`job::JobSpec`]: a validated job, parsed once from TOML; the coordinator
//!   and every site see the same canonical JSON of it and bind to its hash.
//! - [`tensor`]: splitting a flat `f32` parameter vector into ≤ 1 MiB chunks
//!   and reassembling it with length checks.
//! - [`checkpoint`]: parameter vectors on disk, written atomically.
//! - [`memory`]: how a process moving large vectors asks for memory (huge
//!   pages, allocator thresholds).
//! - [`codec`]: the services' gRPC codec (prost, with small first buffers).
//! - [`failpoint`]: named crash points that fault-injection tests arm.
//! - [`evaluation`]: a held-out evaluation as the noised score × label
//!   histogram that leaves a site, and every metric derived from it.
//! - [`mechanism`]: what a ledger entry charged (DP-SGD, a size release,
//!   an evaluation, a clip count).
//! - [`policy`]: a site's policy as checks of a job, which the site and
//!   the coordinator's plan apply alike.
//! - [`reason`]: why a site refused or failed, as a code and the spec's
//!   column names only: the one form a site's reasons leave it in.
//! - [`audit`]: the hash-chained, append-only audit log of every daemon.
//! - [`identity::Role`]: the role a certificate carries in its subject's
//!   organizational unit; the coordinator authorizes every RPC by it.
//!
//! This crate depends on no other workspace crate.

#![deny(clippy::unwrap_used)]
#![deny(missing_docs)]

pub mod audit;
pub mod checkpoint;
pub mod codec;
pub mod config_file;
pub mod evaluation;
pub mod failpoint;
pub mod identity;
pub mod job;
pub mod mechanism;
pub mod memory;
pub mod policy;
pub mod reason;
pub mod tensor;

/// The request metadata key that carries a `ReserveUpload` lease to
/// `PushUpdate`.
pub const UPLOAD_LEASE_METADATA: &str = "x-meridian-upload-lease";

/// Generated protobuf messages and gRPC services of `meridian.v1`.
#[allow(missing_docs, clippy::all, clippy::unwrap_used)]
pub mod pb {
    tonic::include_proto!("meridian.v1");
}
