//! What crosses the wire between Meridian's parties: the gRPC API
//! (`meridian.v1`), how tensors are cut into chunks and checked on arrival,
//! and how a certificate names its holder and role.
//!
//! # Brief overview
//! - [`pb`]: generated messages, clients and servers for `meridian.v1`
//!   (built by `build.rs` with protox; no `protoc` is needed).
//! - [`tensor`]: splitting a flat `f32` parameter vector into ≤ 1 MiB chunks
//!   and reassembling it with length and finiteness checks.
//! - [`codec`]: the services' gRPC codec (prost, with small first buffers).
//! - [`convert`]: the spec's mechanisms and reasons to and from messages.
//! - [`identity`]: the role a certificate carries in its subject's
//!   organizational unit (and a steward's site), and the TLS set-up of
//!   every party.
//! - [`decision`]: a steward's decision signed with its own key, and the
//!   check a site makes of one without trusting the coordinator.

pub mod codec;
pub mod convert;
pub mod decision;
pub mod identity;
pub mod tensor;

/// The request metadata key that carries a `ReserveUpload` lease to
/// `PushUpdate`.
pub const UPLOAD_LEASE_METADATA: &str = "x-meridian-upload-lease";

/// Generated protobuf messages and gRPC services of `meridian.v1`.
#[allow(missing_docs, clippy::all, clippy::unwrap_used)]
pub mod pb {
    tonic::include_proto!("meridian.v1");
}
