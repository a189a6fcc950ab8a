//! An update on the wire: its header, then its values in chunks that are
//! encoded as they are sent, so the encoded update never sits in memory
//! whole, paced to the site's `upload_limit_mb_per_sec` when one is set.
//!
//! A paced upload is cut into chunks of at most a tenth of a second's worth
//! of bytes, so the coordinator sees steady progress: it waits past a
//! round's deadline for an upload that keeps moving and drops one that is
//! silent for its idle timeout (`coordinator::transfers`).
//!
//! [`push_reserved`] first waits for an upload slot (`ReserveUpload`), so
//! that the update leaves only once the coordinator will read it: a
//! thousand sites finishing at once then cost the coordinator memory for
//! the sixteen it reads, not a flow-control window of each.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use proto::pb;
use proto::pb::worker_service_client::WorkerServiceClient;
use proto::tensor::{CHUNK_VALUES, chunk_view};
use tonic::transport::Channel;

/// Values per chunk for an upload capped at `limit` bytes per second.
fn chunk_values(limit: Option<f64>) -> usize {
    match limit {
        Some(bytes_per_sec) => ((bytes_per_sec / 10.0 / 4.0) as usize).clamp(1, CHUNK_VALUES),
        None => CHUNK_VALUES,
    }
}

/// Sends an update: reserves an upload slot, then pushes `header` and
/// `values` with the lease. A coordinator that predates `ReserveUpload`
/// gets the push without one.
pub async fn push_reserved(
    client: &mut WorkerServiceClient<Channel>,
    header: pb::UpdateHeader,
    values: Arc<Vec<f32>>,
    limit: Option<f64>,
) -> Result<pb::PushUpdateResponse, tonic::Status> {
    let reserve = pb::ReserveUploadRequest {
        job_id: header.job_id.clone(),
        round: header.round,
    };
    let lease = match client.reserve_upload(reserve).await {
        Ok(reply) => Some(reply.into_inner().lease),
        Err(status) if status.code() == tonic::Code::Unimplemented => None,
        Err(status) => return Err(status),
    };
    let mut request = tonic::Request::new(update_messages(header, values, limit));
    if let Some(value) = lease.and_then(|lease| lease.parse().ok()) {
        request
            .metadata_mut()
            .insert(proto::UPLOAD_LEASE_METADATA, value);
    }
    Ok(client.push_update(request).await?.into_inner())
}

/// The messages of one `PushUpdate` call: `header`, then `values`.
pub fn update_messages(
    header: pb::UpdateHeader,
    values: Arc<Vec<f32>>,
    limit: Option<f64>,
) -> impl Stream<Item = pb::UpdateChunk> + Send + 'static {
    let per_chunk = chunk_values(limit);
    let start = tokio::time::Instant::now();
    let data = futures::stream::unfold(0usize, move |offset| {
        let values = Arc::clone(&values);
        async move {
            if offset >= values.len() {
                return None;
            }
            if let Some(rate) = limit {
                // Chunk k leaves no earlier than the bytes before it allow at `rate`.
                tokio::time::sleep_until(
                    start + Duration::from_secs_f64(offset as f64 * 4.0 / rate),
                )
                .await;
            }
            let end = (offset + per_chunk).min(values.len());
            let chunk = pb::UpdateChunk {
                part: Some(pb::update_chunk::Part::Data(chunk_view(&values, offset..end))),
            };
            Some((chunk, end))
        }
    });
    futures::stream::once(async move {
        pb::UpdateChunk {
            part: Some(pb::update_chunk::Part::Header(header)),
        }
    })
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
        let messages: Vec<_> = update_messages(pb::UpdateHeader::default(), values, None)
            .collect()
            .await;
        assert!(matches!(
            messages[0].part,
            Some(pb::update_chunk::Part::Header(_))
        ));
        assert_eq!(data_lengths(&messages), vec![CHUNK_VALUES * 4, 12]);
    }

    #[tokio::test]
    async fn a_limited_upload_is_paced_in_tenth_of_a_second_chunks() {
        // 40 kB/s: chunks of 4 kB (1,000 values); 10,000 values take 0.9 s to start the last chunk.
        let values = Arc::new((0..10_000).map(|i| i as f32).collect::<Vec<f32>>());
        let started = tokio::time::Instant::now();
        let messages: Vec<_> = update_messages(
            pb::UpdateHeader::default(),
            Arc::clone(&values),
            Some(40_000.0),
        )
        .collect()
        .await;
        assert_eq!(data_lengths(&messages), vec![4_000; 10]);
        let elapsed = started.elapsed();
        // A lower bound only: pacing may never send early (tests assert no upper timing bounds).
        assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
        let mut asm = proto::tensor::ChunkAssembler::new(values.len());
        for m in &messages[1..] {
            if let Some(pb::update_chunk::Part::Data(d)) = &m.part {
                asm.push(d).unwrap();
            }
        }
        assert_eq!(asm.finish().unwrap(), *values);
    }
}
