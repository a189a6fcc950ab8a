//! An update on the wire: its header, then its values in chunks that are
//! encoded as they are sent, so the encoded update never sits in memory
//! whole, paced to the site's `upload_limit_mb_per_sec` when one is set.
//!
//! A paced upload is cut into chunks of at most a tenth of a second's worth
//! of bytes, so the coordinator sees steady progress: it waits past a
//! round's deadline for an upload that keeps moving and drops one that is
//! silent for its idle timeout (`meridian_coordinator::upload::transfers`).
//!
//! [`push_reserved`] first waits for an upload slot (`ReserveUpload`), so
//! that the update leaves only once the coordinator will read it: a
//! thousand sites finishing at once then cost the coordinator memory for
//! the sixteen it reads, not a flow-control window of each.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use meridian_wire::pb;
use meridian_wire::pb::worker_service_client::WorkerServiceClient;
use meridian_wire::tensor::{CHUNK_VALUES, chunk_view};
use tonic::transport::Channel;
use tracing::warn;

use crate::error::TransferError;

/// Values per chunk for an upload capped at `limit` bytes per second.
fn chunk_values(limit: Option<f64>) -> usize {
    match limit {
        Some(bytes_per_sec) => ((bytes_per_sec / 10.0 / 4.0) as usize).clamp(1, CHUNK_VALUES),
        None => CHUNK_VALUES,
    }
}

/// Sends an update: reserves an upload slot, then pushes `header` and
/// `values` with the lease. An update of
/// [`PARTED_FROM_BYTES`](crate::download::PARTED_FROM_BYTES) or more, not
/// paced, goes in two parts at once, over `session` and `second` (the
/// reason is the pull's, in [`crate::download`]), where the coordinator
/// grants them; otherwise it goes whole over `session`. A coordinator that
/// predates `ReserveUpload` gets the push without a lease.
pub async fn push_reserved(
    session: &mut WorkerServiceClient<Channel>,
    second: &mut WorkerServiceClient<Channel>,
    header: pb::UpdateHeader,
    values: Arc<Vec<f32>>,
    limit: Option<f64>,
) -> Result<pb::PushUpdateResponse, TransferError> {
    let large = values.len() as u64 * 4 >= crate::download::PARTED_FROM_BYTES;
    let reserve = pb::ReserveUploadRequest {
        job_id: header.job_id.clone(),
        round: header.round,
        parts: if large && limit.is_none() { 2 } else { 1 },
    };
    let (lease, parts) = match session.reserve_upload(reserve.clone()).await {
        Ok(reply) => {
            let reply = reply.into_inner();
            (Some(reply.lease), reply.parts)
        }
        Err(status) if status.code() == tonic::Code::Unimplemented => (None, 0),
        Err(status) => return Err(status.into()),
    };
    if reserve.parts < 2 || parts < 2 {
        let whole = 0..values.len();
        return push(session, header, values, whole, limit, lease.as_deref()).await;
    }
    // Two parts of whole chunks; one id for both, new for each upload.
    let cut = (values.len() / 2).div_ceil(CHUNK_VALUES) * CHUNK_VALUES;
    let upload_id = format!("{:032x}", rand::random::<u128>());
    let part = |range: &std::ops::Range<usize>| pb::UpdateHeader {
        first_value: range.start as u64,
        value_count: range.len() as u64,
        upload_id: upload_id.clone(),
        ..header.clone()
    };
    let (first, rest) = (0..cut, cut..values.len());
    let parted = tokio::try_join!(
        push(session, part(&first), Arc::clone(&values), first, None, lease.as_deref()),
        push(second, part(&rest), Arc::clone(&values), rest, None, lease.as_deref()),
    );
    match parted {
        Ok((first, rest)) => combine(first, rest),
        // A second connection that could not be opened (a proxy that allows
        // one per client, say) is not a reason to fail: sent whole, under a
        // lease of its own (which releases the one of two slots).
        Err(e) if e.code() == tonic::Code::Unavailable => {
            warn!(error = %e, "an upload in two parts failed; sending the update whole");
            let reserve = pb::ReserveUploadRequest { parts: 1, ..reserve };
            let lease = session.reserve_upload(reserve).await?.into_inner().lease;
            let whole = 0..values.len();
            push(session, header, values, whole, limit, Some(&lease)).await
        }
        Err(e) => Err(e),
    }
}

/// The verdict on an update sent in two parts, from the coordinator's
/// replies to each: refused if either part was, accepted if the last part
/// to arrive made it whole. Accepted parts of which none made the update
/// whole (the coordinator dropped the first while waiting for the second)
/// are an error, so that the update is sent again.
fn combine(
    first: pb::PushUpdateResponse,
    rest: pb::PushUpdateResponse,
) -> Result<pb::PushUpdateResponse, TransferError> {
    match (first, rest) {
        (refused, _) | (_, refused) if !refused.accepted => Ok(refused),
        (whole, _) | (_, whole) if whole.complete => Ok(whole),
        (first, _) => Err(TransferError::Uncounted { reason: first.reason }),
    }
}

/// One `PushUpdate` call: `header`, then `values[range]`, under `lease`.
async fn push(
    client: &mut WorkerServiceClient<Channel>,
    header: pb::UpdateHeader,
    values: Arc<Vec<f32>>,
    range: std::ops::Range<usize>,
    limit: Option<f64>,
    lease: Option<&str>,
) -> Result<pb::PushUpdateResponse, TransferError> {
    let mut request = tonic::Request::new(update_messages(header, values, range, limit));
    if let Some(value) = lease.and_then(|lease| lease.parse().ok()) {
        request.metadata_mut().insert(meridian_wire::UPLOAD_LEASE_METADATA, value);
    }
    Ok(client.push_update(request).await?.into_inner())
}

/// The messages of one `PushUpdate` call: `header`, then `values[range]`.
pub fn update_messages(
    header: pb::UpdateHeader,
    values: Arc<Vec<f32>>,
    range: std::ops::Range<usize>,
    limit: Option<f64>,
) -> impl Stream<Item = pb::UpdateChunk> + Send + 'static {
    let per_chunk = chunk_values(limit);
    let start = tokio::time::Instant::now();
    let first = range.start;
    let data = futures::stream::unfold(range.start, move |offset| {
        let values = Arc::clone(&values);
        async move {
            if offset >= range.end {
                return None;
            }
            if let Some(rate) = limit {
                // Chunk k leaves no earlier than the bytes before it allow at `rate`.
                tokio::time::sleep_until(start + Duration::from_secs_f64((offset - first) as f64 * 4.0 / rate)).await;
            }
            let end = (offset + per_chunk).min(range.end);
            let chunk = pb::UpdateChunk { part: Some(pb::update_chunk::Part::Data(chunk_view(&values, offset..end))) };
            Some((chunk, end))
        }
    });
    futures::stream::once(async move { pb::UpdateChunk { part: Some(pb::update_chunk::Part::Header(header)) } })
        .chain(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_lengths(messages: &[pb::UpdateChunk]) -> Vec<usize> {
        messages
            .iter()
            .skip(1)
            .map(|m| match &m.part {
                Some(pb::update_chunk::Part::Data(d)) => d.len(),
                _ => panic!("a header after the first message"),
            })
            .collect()
    }

    #[tokio::test]
    async fn unlimited_uploads_use_whole_chunks() {
        let values = Arc::new(vec![0.5f32; CHUNK_VALUES + 3]);
        let whole = 0..values.len();
        let messages: Vec<_> = update_messages(pb::UpdateHeader::default(), values, whole, None).collect().await;
        assert!(matches!(messages[0].part, Some(pb::update_chunk::Part::Header(_))));
        assert_eq!(data_lengths(&messages), vec![CHUNK_VALUES * 4, 12]);
    }

    #[tokio::test]
    async fn a_limited_upload_is_paced_in_tenth_of_a_second_chunks() {
        // 40 kB/s: chunks of 4 kB (1,000 values); 10,000 values take 0.9 s to start the last chunk.
        let values = Arc::new((0..10_000).map(|i| i as f32).collect::<Vec<f32>>());
        let started = tokio::time::Instant::now();
        let messages: Vec<_> =
            update_messages(pb::UpdateHeader::default(), Arc::clone(&values), 0..values.len(), Some(40_000.0))
                .collect()
                .await;
        assert_eq!(data_lengths(&messages), vec![4_000; 10]);
        let elapsed = started.elapsed();
        // A lower bound only: pacing may never send early (tests assert no upper timing bounds).
        assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
        let mut asm = meridian_wire::tensor::ChunkAssembler::new(values.len());
        for m in &messages[1..] {
            if let Some(pb::update_chunk::Part::Data(d)) = &m.part {
                asm.push(d).unwrap();
            }
        }
        assert_eq!(asm.finish().unwrap(), *values);
    }

    #[tokio::test]
    async fn a_part_carries_its_range_of_values() {
        let values = Arc::new((0..CHUNK_VALUES * 2 + 5).map(|i| i as f32).collect::<Vec<f32>>());
        let messages: Vec<_> =
            update_messages(pb::UpdateHeader::default(), Arc::clone(&values), CHUNK_VALUES..values.len(), None)
                .collect()
                .await;
        assert_eq!(data_lengths(&messages), vec![CHUNK_VALUES * 4, 20]);
        let mut asm = meridian_wire::tensor::ChunkAssembler::new(CHUNK_VALUES + 5);
        for m in &messages[1..] {
            if let Some(pb::update_chunk::Part::Data(d)) = &m.part {
                asm.push(d).unwrap();
            }
        }
        assert_eq!(asm.finish().unwrap(), values[CHUNK_VALUES..]);
    }

    #[test]
    fn two_parts_are_refused_if_either_is_and_accepted_if_one_made_the_update_whole() {
        let reply = |accepted, complete, reason: &str| pb::PushUpdateResponse {
            accepted,
            complete,
            reason: reason.to_string(),
        };
        let part = reply(true, false, "part received");
        let whole = reply(true, true, "");
        let refused = reply(false, false, "norm");
        assert_eq!(combine(part.clone(), whole.clone()).unwrap(), whole);
        assert_eq!(combine(whole.clone(), part.clone()).unwrap(), whole);
        assert_eq!(combine(part.clone(), refused.clone()).unwrap(), refused);
        assert_eq!(combine(refused.clone(), whole.clone()).unwrap(), refused);
        let err = combine(part.clone(), part).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Aborted);
    }
}
