//! A global model off the wire: its header checked against the job, then
//! its chunks checked and copied into memory the site used before, a large
//! model in two parts over two connections at once.
//!
//! On one connection, a transfer's work runs as a pipeline: the sender's
//! encoding and encryption, the kernel's copies, the receiver's decryption
//! and copies, each stage waking the next. Measured on 400 MB transfers
//! between two processes on 2 vCPUs, both cores were idle 17–36 % of the
//! time inside a transfer, its stages waiting on each other. A second
//! connection carries the other half through a pipeline of its own, which
//! fills those gaps: idle 6–14 %, a pull over a 5-round job 0.96–1.16 →
//! 1.19–1.33 GB/s (`BENCHMARKS.md`, session 11). A model below
//! [`PARTED_FROM_BYTES`] is pulled whole over the session's connection: a
//! second one would not pay for its handshake.

use std::time::Duration;

use futures::StreamExt;
use proto::pb;
use proto::pb::worker_service_client::WorkerServiceClient;
use proto::tensor::{PartAssembler, PartedAssembly};
use tonic::Status;
use tonic::transport::Channel;
use tracing::warn;

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
) -> Result<Vec<f32>, Status> {
    let count = usize::try_from(wanted.num_params).map_err(|_| {
        Status::invalid_argument(format!(
            "a model of {} values does not fit in memory",
            wanted.num_params
        ))
    })?;
    let mut assembly = PartedAssembly::reusing(count, buffer).map_err(|e| {
        Status::resource_exhausted(format!(
            "no memory for a model of {} values: {e}",
            wanted.num_params
        ))
    })?;
    if wanted.num_params.saturating_mul(4) >= PARTED_FROM_BYTES {
        let parted = {
            let mut parts = assembly.parts(2).into_iter();
            match (parts.next(), parts.next()) {
                (Some(first), Some(rest)) => tokio::try_join!(
                    pull_part(session, wanted, first, idle),
                    pull_part(second, wanted, rest, idle)
                )
                .map(|_| ()),
                (Some(whole), None) => pull_part(session, wanted, whole, idle).await,
                _ => Err(Part::Failed(Status::internal("a model cut into no parts"))),
            }
        };
        match parted {
            // A second connection that could not be opened (a proxy that
            // allows one per client, say) is not a reason to fail: pulled whole below.
            Err(Part::Failed(status)) if status.code() == tonic::Code::Unavailable => {
                warn!(error = %status, "a pull in two parts failed; pulling the model whole");
            }
            Ok(()) => {
                return assembly
                    .finish()
                    .map_err(|e| Status::data_loss(e.to_string()));
            }
            Err(Part::Failed(status)) => return Err(status),
            // An older coordinator: pulled whole below.
            Err(Part::NotServed) => {}
        }
    }
    let whole = assembly.parts(1).into_iter().next();
    match whole {
        Some(whole) => pull_part(session, wanted, whole, idle)
            .await
            .map_err(|e| match e {
                Part::Failed(status) => status,
                Part::NotServed => {
                    Status::data_loss("the coordinator did not serve the model asked for")
                }
            })?,
        None => return Err(Status::internal("a model cut into no parts")),
    }
    assembly
        .finish()
        .map_err(|e| Status::data_loss(e.to_string()))
}

/// Why a part was not pulled.
enum Part {
    Failed(Status),
    /// The coordinator predates parts: its header says it sends the whole
    /// model, not the part asked for (nothing of it was read).
    NotServed,
}

impl From<Status> for Part {
    fn from(status: Status) -> Self {
        Part::Failed(status)
    }
}

/// Pulls one part of the model into `part`.
async fn pull_part(
    client: &mut WorkerServiceClient<Channel>,
    wanted: Wanted<'_>,
    mut part: PartAssembler<'_>,
    idle: Duration,
) -> Result<(), Part> {
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
    let silent = || {
        Status::deadline_exceeded(format!(
            "the model stream was silent for more than the idle timeout of {} s",
            idle.as_secs()
        ))
    };
    let header = match tokio::time::timeout(idle, stream.next())
        .await
        .map_err(|_| silent())?
    {
        Some(Ok(pb::ModelChunk {
            part: Some(pb::model_chunk::Part::Header(h)),
        })) => h,
        Some(Err(e)) => return Err(e.into()),
        _ => return Err(Status::data_loss("model stream did not start with a header").into()),
    };
    if header.layout_hash != wanted.layout_hash || header.num_params != wanted.num_params {
        return Err(Status::data_loss(format!(
            "model layout {} / {} values does not match the job's {} / {}",
            header.layout_hash, header.num_params, wanted.layout_hash, wanted.num_params
        ))
        .into());
    }
    // A coordinator that predates parts says 0 and 0, and sends the whole model.
    let older = (header.first_value, header.value_count) == (0, 0);
    let served = if older {
        (0, wanted.num_params)
    } else {
        (header.first_value, header.value_count)
    };
    if served != asked {
        if older {
            return Err(Part::NotServed);
        }
        return Err(Status::data_loss(format!(
            "the coordinator sent values {}..{} of the model for values {}..{}",
            served.0,
            served.0.saturating_add(served.1),
            asked.0,
            asked.0 + asked.1
        ))
        .into());
    }
    while let Some(chunk) = tokio::time::timeout(idle, stream.next())
        .await
        .map_err(|_| silent())?
    {
        match chunk?.part {
            Some(pb::model_chunk::Part::Data(d)) => part
                .push(&d)
                .map_err(|e| Status::data_loss(e.to_string()))?,
            _ => return Err(Status::data_loss("a second header in the model stream").into()),
        }
    }
    part.finish()
        .map_err(|e| Status::data_loss(e.to_string()).into())
}
