//! A global model off the wire: its header checked against the job, then
//! its chunks checked and copied into memory the site used before, a large
//! model in two parts over two connections at once.
//!
//! On one connection, a transfer's work runs as a pipeline: the sender's
//! encoding and encryption, the kernel's copies, the receiver's decryption
//! and copies, each stage waking the next, and on few cores both sit idle
//! for much of a transfer, its stages waiting on each other. A second
//! connection carries the other half through a pipeline of its own, which
//! fills those gaps (`docs/perf-log.md`, "Figures moved from rustdoc"). A
//! model below
//! [`PARTED_FROM_BYTES`] is pulled whole over the session's connection: a
//! second one would not pay for its handshake.

use std::time::Duration;

use futures::StreamExt;
use meridian_wire::pb;
use meridian_wire::pb::worker_service_client::WorkerServiceClient;
use meridian_wire::tensor::{PartAssembler, PartedAssembly};
use tonic::transport::Channel;
use tracing::warn;

use crate::error::TransferError;

/// Model size from which a pull goes over two connections.
pub const PARTED_FROM_BYTES: u64 = 32 << 20;

/// The model a site asks for, and what its header must say.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    /// The job whose model it is.
    pub job_id: &'a str,
    /// The round after which the model was made (0: the initial model).
    pub round: u32,
    /// The job's parameter layout, which the header must name.
    pub layout_hash: &'a str,
    /// The whole model's values, which the header must announce.
    pub num_params: u64,
}

/// Pulls the model `wanted` into `buffer`'s memory (see
/// `ChunkAssembler::reusing`): over `session` alone, or, for a model of
/// [`PARTED_FROM_BYTES`] or more, half over `session` and half over
/// `second`. A stream silent for `idle` fails the pull.
pub async fn pull_model(
    session: &mut WorkerServiceClient<Channel>,
    second: &mut WorkerServiceClient<Channel>,
    wanted: Wanted<'_>,
    buffer: Vec<f32>,
    idle: Duration,
) -> Result<Vec<f32>, TransferError> {
    let values = wanted.num_params;
    let count = usize::try_from(values).map_err(|_| TransferError::TooLarge { values })?;
    let mut assembly =
        PartedAssembly::reusing(count, buffer).map_err(|refused| TransferError::NoMemory { values, refused })?;
    if values.saturating_mul(4) >= PARTED_FROM_BYTES {
        let parted = {
            let mut parts = assembly.parts(2).into_iter();
            match (parts.next(), parts.next()) {
                (Some(first), Some(rest)) => {
                    tokio::try_join!(pull_part(session, wanted, first, idle), pull_part(second, wanted, rest, idle))
                        .map(|_| ())
                }
                (Some(whole), None) => pull_part(session, wanted, whole, idle).await,
                _ => Err(TransferError::NoParts),
            }
        };
        match parted {
            Ok(()) => return Ok(assembly.finish()?),
            // A second connection that could not be opened (a proxy that
            // allows one per client, say) is not a reason to fail: pulled whole below.
            Err(e) if e.code() == tonic::Code::Unavailable => {
                warn!(error = %e, "a pull in two parts failed; pulling the model whole");
            }
            // An older coordinator: pulled whole below.
            Err(TransferError::NotServed) => {}
            Err(e) => return Err(e),
        }
    }
    let whole = assembly.parts(1).into_iter().next().ok_or(TransferError::NoParts)?;
    pull_part(session, wanted, whole, idle).await?;
    Ok(assembly.finish()?)
}

/// Pulls one part of the model into `part`; [`TransferError::NotServed`]
/// when the coordinator predates parts and would send the whole model.
async fn pull_part(
    client: &mut WorkerServiceClient<Channel>,
    wanted: Wanted<'_>,
    mut part: PartAssembler<'_>,
    idle: Duration,
) -> Result<(), TransferError> {
    let asked = (part.first_value() as u64, part.len() as u64);
    // The whole model is asked for as 0 and 0, as before parts.
    let whole = asked == (0, wanted.num_params);
    let request = pb::PullModelRequest {
        job_id: wanted.job_id.to_string(),
        round: wanted.round,
        first_value: if whole { 0 } else { asked.0 },
        value_count: if whole { 0 } else { asked.1 },
    };
    let mut stream = client.pull_model(request).await?.into_inner();
    let silent = |_| TransferError::Silent { secs: idle.as_secs() };
    let header = match tokio::time::timeout(idle, stream.next()).await.map_err(silent)? {
        Some(Ok(pb::ModelChunk { part: Some(pb::model_chunk::Part::Header(h)) })) => h,
        Some(Err(e)) => return Err(e.into()),
        _ => return Err(TransferError::NoHeader),
    };
    check_header(&header, wanted, asked)?;
    while let Some(chunk) = tokio::time::timeout(idle, stream.next()).await.map_err(silent)? {
        match chunk?.part {
            Some(pb::model_chunk::Part::Data(d)) => part.push(&d)?,
            _ => return Err(TransferError::SecondHeader),
        }
    }
    Ok(part.finish()?)
}

/// Checks that a part's header is of the model `wanted` and serves the
/// values `asked` for (first value, count).
fn check_header(header: &pb::ModelHeader, wanted: Wanted<'_>, asked: (u64, u64)) -> Result<(), TransferError> {
    if header.layout_hash != wanted.layout_hash || header.num_params != wanted.num_params {
        return Err(TransferError::Layout {
            layout: header.layout_hash.clone(),
            values: header.num_params,
            wanted_layout: wanted.layout_hash.to_string(),
            wanted_values: wanted.num_params,
        });
    }
    // A coordinator that predates parts says 0 and 0, and sends the whole model.
    let older = (header.first_value, header.value_count) == (0, 0);
    let served = if older { (0, wanted.num_params) } else { (header.first_value, header.value_count) };
    match (served == asked, older) {
        (true, _) => Ok(()),
        (false, true) => Err(TransferError::NotServed),
        (false, false) => Err(TransferError::WrongPart { served, asked }),
    }
}
