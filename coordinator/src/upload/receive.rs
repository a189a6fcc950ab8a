//! One `PushUpdate` stream, from its header to its stored row: a receiving
//! slot, the header, the site's charge mirrored, the checks of
//! [`admission`], the values streamed to disk chunk by chunk, the parts of
//! an update sent in parts joined, and the row that makes it count.
//!
//! A refusal (a reason the site can act on) ends a stream the same way
//! from every step: logged, recorded in the audit log, and answered with
//! `accepted: false`; the round goes on without it. An error is the
//! coordinator's own failure, or the stream's, and the RPC fails with it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meridian_store::checkpoint::{self, CheckpointWriter};
use meridian_sys::failpoint;
use meridian_wire::pb;
use tokio::sync::OwnedSemaphorePermit;
use tokio_stream::StreamExt;
use tonic::metadata::MetadataMap;
use tonic::{Request, Streaming};
use tracing::{info, warn};

use super::ReceiveError;
use super::admission::{self, Expected, PartOfUpdate, UpdateReceiver};
use super::incoming::UpdateFile;
use super::parts::{self, Arrival, PartStream, ReceivedPart};
use super::transfers::TransferGuard;
use crate::engine::Coordinator;
use crate::store::{Insert, JobRow, JobSiteRow, JobState, RoundRelease, StoreError, UpdateRow};

/// How receiving an update stops short of counting it.
enum Halt {
    /// Refused, with a reason the site can act on: an answer, not an error.
    Refused(String),
    /// The update could not be received.
    Failed(ReceiveError),
}

impl From<admission::Refusal> for Halt {
    fn from(refusal: admission::Refusal) -> Halt {
        Halt::Refused(refusal.to_string())
    }
}

impl From<parts::PartError> for Halt {
    fn from(refusal: parts::PartError) -> Halt {
        Halt::Refused(refusal.to_string())
    }
}

impl From<ReceiveError> for Halt {
    fn from(e: ReceiveError) -> Halt {
        Halt::Failed(e)
    }
}

impl From<StoreError> for Halt {
    fn from(e: StoreError) -> Halt {
        Halt::Failed(e.into())
    }
}

/// Receives the update `site` streams in `request` (`PushUpdate`): its
/// answer, `accepted` with `complete` once the update counts in its round
/// (or with `complete: false` for a part whose other parts are still to
/// come), or refused with the reason.
pub async fn receive(
    co: &Coordinator,
    site: &str,
    request: Request<Streaming<pb::UpdateChunk>>,
) -> Result<pb::PushUpdateResponse, ReceiveError> {
    let _slot = receiving_slot(co, site, request.metadata()).await?;
    let mut stream = request.into_inner();
    let header = read_header(co, &mut stream).await?;
    let job = co.store.job(&header.job_id)?.ok_or_else(|| ReceiveError::NoJob(header.job_id.clone()))?;
    // The site's charges are mirrored before anything can refuse the update: they were spent.
    co.store.mirror_own(site, &job.id, header.ledger_entry.as_slice())?;
    let participant = co
        .store
        .participant(&job.id, site)?
        .ok_or_else(|| ReceiveError::NotParticipant { site: site.to_string(), job_id: job.id.clone() })?;
    let arriving = Arriving { co, site, job: &job, header: &header, expected: expected(&job, &participant) };
    match arriving.admit(&mut stream).await {
        Ok(answer) => Ok(answer),
        Err(Halt::Refused(reason)) => Ok(arriving.reject(reason)),
        Err(Halt::Failed(e)) => Err(e),
    }
}

/// A receiving slot for the stream: at most [`RECEIVING_AT_ONCE`](super::RECEIVING_AT_ONCE) updates
/// are read at a time. A site that reserved a slot (`ReserveUpload`)
/// brings it in its lease; any other waits here, unread, so HTTP/2 flow
/// control holds it to one window.
async fn receiving_slot(
    co: &Coordinator,
    site: &str,
    metadata: &MetadataMap,
) -> Result<OwnedSemaphorePermit, ReceiveError> {
    let lease = metadata
        .get(meridian_wire::UPLOAD_LEASE_METADATA)
        .and_then(|v| v.to_str().ok())
        .and_then(|id| co.uploads.leases.claim(id, site));
    match lease {
        Some(slot) => Ok(slot),
        None => co.uploads.wait_for_slots(site, 1).await,
    }
}

/// The stream's first message, which must be its header; a stream that
/// never sends one must not keep its slot, so it is waited for only for
/// the idle timeout.
async fn read_header(
    co: &Coordinator,
    stream: &mut Streaming<pb::UpdateChunk>,
) -> Result<pb::UpdateHeader, ReceiveError> {
    let first = tokio::time::timeout(Duration::from_secs(co.idle_timeout_secs), stream.next())
        .await
        .map_err(|_| ReceiveError::NoHeader)?
        .ok_or(ReceiveError::Empty)?
        .map_err(ReceiveError::Stream)?;
    match first.part {
        Some(pb::update_chunk::Part::Header(header)) => Ok(header),
        _ => Err(ReceiveError::HeaderNotFirst),
    }
}

/// What `job` expects of an update from the site whose row is `participant`.
fn expected<'a>(job: &'a JobRow, participant: &JobSiteRow) -> Expected<'a> {
    Expected {
        job_id: &job.id,
        state: job.state.as_str(),
        running: job.state == JobState::Running,
        current_round: job.current_round,
        layout_hash: &job.layout_hash,
        num_params: job.num_params,
        spec_hash: &job.spec_hash,
        max_update_norm: job.spec.policy.max_update_norm,
        declared_examples: participant.train_examples,
        releases_clip_count: job.spec.privacy.clip_count_noise > 0.0,
    }
}

/// The values of one stream, committed to their file.
struct Streamed {
    /// Their sum of squares, for a part (see [`UpdateReceiver::finish`]).
    sum_of_squares: Option<f64>,
    /// When the first data chunk was waited for.
    started: Instant,
    /// How long the values took to arrive.
    took: Duration,
}

/// An update stream whose header named a job the site takes part in.
struct Arriving<'a> {
    co: &'a Coordinator,
    site: &'a str,
    job: &'a JobRow,
    header: &'a pb::UpdateHeader,
    expected: Expected<'a>,
}

impl Arriving<'_> {
    /// Checks the header, receives the values and stores the update.
    async fn admit(&self, stream: &mut Streaming<pb::UpdateChunk>) -> Result<pb::PushUpdateResponse, Halt> {
        let entry = admission::check_header(&self.expected, self.site, self.header)?.clone();
        let part = self.begin_part()?;
        // A transfer that keeps making progress is waited for past the round's
        // deadline; one silent for the idle timeout is dropped. It stays
        // visible until the update's row is stored.
        let transfer = self.co.uploads.transfers.start(&self.job.id, self.site);
        let name = format!("r{:04}-{}-{:08x}", self.header.round, self.site, rand::random::<u32>());
        let updates = self.co.job_dir(&self.job.id).join("updates");
        let whole = updates.join(format!("{name}.bin"));
        let (path, streamed) = match &part {
            None => (whole.clone(), self.receive_values(stream, &whole, None, &transfer).await?),
            Some((part, stream_of_part)) => {
                // A part is a parameter file of its own until the last part lists them all.
                let path = parts::part_file(&updates, &name, part.first_value);
                let streamed = self.receive_values(stream, &path, Some((part, stream_of_part)), &transfer).await?;
                let (first_value, value_count) = (part.first_value, part.value_count);
                let received = ReceivedPart { path, first_value, value_count, sum_of_squares: streamed.sum_of_squares };
                match self.join(stream_of_part, received, whole).await? {
                    Some(whole) => (whole, streamed),
                    None => return Ok(self.part_waiting(part)),
                }
            }
        };
        self.record(&entry, &path)?;
        failpoint::hit("update.persisted");
        Ok(self.accepted(&entry, streamed.took, streamed.started.elapsed() - streamed.took))
    }

    /// The part of an update the header announces, announced to its upload
    /// (`None`: the update is sent whole). Every part of an upload carries
    /// the same header but for its range.
    fn begin_part(&self) -> Result<Option<(PartOfUpdate, PartStream<'_>)>, Halt> {
        let Some(part) = admission::check_part(self.header)? else {
            return Ok(None);
        };
        let update = (self.job.id.as_str(), self.header.round, self.site);
        let stream_of_part =
            self.co.uploads.parts.begin(update, &part.upload_id, admission::upload_identity(self.header))?;
        Ok(Some((part, stream_of_part)))
    }

    /// Streams the values (the whole update's, or `part`'s) to a file at
    /// `path`, each chunk written as it passes its checks, then commits the
    /// file. A part refused or failed on the way drops its upload.
    async fn receive_values(
        &self,
        stream: &mut Streaming<pb::UpdateChunk>,
        path: &Path,
        part: Option<(&PartOfUpdate, &PartStream<'_>)>,
        transfer: &TransferGuard<'_>,
    ) -> Result<Streamed, Halt> {
        // One chunk in memory per transfer. Read back once, when the round
        // is aggregated: kept out of the page cache.
        let values = part.map_or(self.job.num_params, |(p, _)| p.value_count);
        let file = CheckpointWriter::create_uncached(path, values).map_err(ReceiveError::from)?;
        let mut file = UpdateFile::new(file);
        let receiver = match part {
            None => UpdateReceiver::new(&self.expected),
            Some((part, _)) => UpdateReceiver::part(&self.expected, part),
        };
        let started = Instant::now();
        let streamed = self.stream_values(stream, receiver, &mut file, transfer).await;
        let took = started.elapsed();
        match streamed {
            Ok(sum_of_squares) => {
                file.commit("update.rename").await.map_err(ReceiveError::from)?;
                Ok(Streamed { sum_of_squares, started, took })
            }
            // Dropping the file removes it.
            Err(halt) => {
                if let Some((_, stream_of_part)) = part {
                    self.co.uploads.parts.abandon(stream_of_part);
                }
                Err(halt)
            }
        }
    }

    /// Reads the data chunks to the end of the stream, checking each with
    /// `receiver` and writing it to `file`; gives what
    /// [`UpdateReceiver::finish`] gives.
    async fn stream_values(
        &self,
        stream: &mut Streaming<pb::UpdateChunk>,
        mut receiver: UpdateReceiver,
        file: &mut UpdateFile,
        transfer: &TransferGuard<'_>,
    ) -> Result<Option<f64>, Halt> {
        let idle = Duration::from_secs(self.co.idle_timeout_secs);
        loop {
            let chunk = match tokio::time::timeout(idle, stream.next()).await {
                Ok(Some(chunk)) => chunk.map_err(ReceiveError::Stream)?,
                Ok(None) => return Ok(receiver.finish()?),
                Err(_) => {
                    return Err(Halt::Refused(format!(
                        "the update stream was silent for more than the idle timeout of {} s; the transfer was dropped",
                        self.co.idle_timeout_secs
                    )));
                }
            };
            let Some(pb::update_chunk::Part::Data(data)) = chunk.part else {
                return Err(Halt::Refused("a second header inside the update stream".to_string()));
            };
            receiver.push(&data)?;
            let len = data.len();
            file.write(data).await.map_err(ReceiveError::from)?;
            transfer.progress(len);
            failpoint::hit("update.receive");
        }
    }

    /// Hands a committed part to its upload. Once every value is in, checks
    /// the norm bound over all the parts and lists them in one parts file
    /// at `whole`, the update's path, which it gives; `None` while other
    /// parts are still to come.
    async fn join(
        &self,
        stream_of_part: &PartStream<'_>,
        received: ReceivedPart,
        whole: PathBuf,
    ) -> Result<Option<PathBuf>, Halt> {
        let parts = match self.co.uploads.parts.arrive(stream_of_part, self.job.num_params, received)? {
            Arrival::Waiting => return Ok(None),
            Arrival::Whole(parts) => parts,
        };
        if let Err(reason) = admission::check_norm(&self.expected, parts.iter().map(|p| p.sum_of_squares)) {
            parts::remove_files(parts);
            return Err(reason.into());
        }
        let listed: Vec<_> = parts.iter().map(|p| (p.path.clone(), p.value_count)).collect();
        // Two fsyncs: on a blocking thread, as the parts' own commits are.
        let list = whole.clone();
        let written =
            tokio::task::spawn_blocking(move || checkpoint::write_parts(&list, &listed, "update.parts")).await;
        let failed = match written {
            Ok(Ok(())) => return Ok(Some(whole)),
            Ok(Err(e)) => ReceiveError::Checkpoint(e),
            Err(e) => ReceiveError::ListingParts(e),
        };
        parts::remove_files(parts);
        Err(failed.into())
    }

    /// Records the durable update at `path` as the site's for its round;
    /// refused, and its file removed, when the site already sent one or the
    /// round closed while it arrived.
    fn record(&self, entry: &pb::LedgerEntry, path: &Path) -> Result<(), Halt> {
        let header = self.header;
        let exact_allowed = self.co.store.releases_exact_metrics(self.site)?;
        let row = UpdateRow {
            site: self.site.to_string(),
            num_examples: header.num_examples,
            released: RoundRelease {
                clipped: header.clipped_count,
                clip_denominator: entry.steps as f64 * entry.sample_rate * header.num_examples as f64,
                exact: if exact_allowed { header.exact_metrics.clone().into_iter().collect() } else { BTreeMap::new() },
            },
            path: path.to_string_lossy().into_owned(),
        };
        let refusal = match self.co.store.insert_update(&self.job.id, header.round, &row)? {
            Insert::Inserted => return Ok(()),
            Insert::Duplicate => format!("{} already sent its update for round {}", self.site, header.round),
            Insert::RoundClosed => {
                format!("round {} closed while the update was arriving; it was not counted", header.round)
            }
        };
        let _ = checkpoint::remove(path);
        Err(Halt::Refused(refusal))
    }

    /// The answer to a part kept until the upload's other parts are in.
    fn part_waiting(&self, part: &PartOfUpdate) -> pb::PushUpdateResponse {
        info!(job_id = %self.job.id, site = %self.site, round = self.header.round, first_value = part.first_value, values = part.value_count, "update part received");
        pb::PushUpdateResponse {
            accepted: true,
            reason: format!(
                "part of values {}..{} received; the update counts once all of its parts are in",
                part.first_value,
                part.first_value + part.value_count
            ),
            complete: false,
        }
    }

    /// Logs and audits a stored update and wakes the job's driver; the answer.
    fn accepted(
        &self,
        entry: &pb::LedgerEntry,
        received_in: Duration,
        persisted_in: Duration,
    ) -> pb::PushUpdateResponse {
        let header = self.header;
        // How long the values took to arrive, then to become durable: an
        // operator's first look at a slow upload.
        let (receive_ms, persist_ms) = (received_in.as_millis() as u64, persisted_in.as_millis() as u64);
        info!(job_id = %self.job.id, site = %self.site, round = header.round, examples = header.num_examples, receive_ms, persist_ms, "update accepted");
        self.co.audit(
            "update.accepted",
            &self.job.id,
            serde_json::json!({
                "site": self.site,
                "round": header.round,
                "examples": header.num_examples,
                "epsilon_round": entry.epsilon_round,
                "epsilon_job": entry.epsilon_job,
                "ledger_seq": entry.seq,
            }),
        );
        self.co.notify();
        pb::PushUpdateResponse { accepted: true, reason: String::new(), complete: true }
    }

    /// Logs and audits a refused update; the answer.
    fn reject(&self, reason: String) -> pb::PushUpdateResponse {
        warn!(job_id = %self.job.id, site = %self.site, round = self.header.round, reason, "update rejected");
        self.co.audit(
            "update.rejected",
            &self.job.id,
            serde_json::json!({ "site": self.site, "round": self.header.round, "reason": reason }),
        );
        pb::PushUpdateResponse { accepted: false, reason, complete: false }
    }
}
