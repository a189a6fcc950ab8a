//! A simulated hospital: its own certificate and connections, speaking the
//! worker protocol with no data behind it. It registers a dataset, accepts
//! the offer, pulls the global model every round, checks it against the
//! last one, and returns a constant update with a ledger entry shaped as
//! the coordinator requires; what it sees goes into the shared [`Observed`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;
use meridian_wire::identity::IdentityFiles;
use meridian_wire::pb;
use meridian_wire::pb::worker_service_client::WorkerServiceClient;
use meridian_worker::download::{Wanted, pull_model};
use meridian_worker::upload::push_reserved;
use tonic::transport::{Channel, Endpoint};

use super::spec::{INPUTS, input_names};

/// Training examples each simulated site declares (its FedAvg weight).
const EXAMPLES: u64 = 100;
/// Score bins of the simulated job's evaluation (the spec's default).
const EVALUATION_BINS: usize = meridian_spec::job::EvaluationSpec::DEFAULT_BINS;
/// Every value of every simulated update.
const UPDATE_VALUE: f32 = 1e-3;

/// How long a model stream may stay silent before the pull fails.
const PULL_IDLE: Duration = Duration::from_secs(60);

/// What the simulated sites observed, shared between them.
#[derive(Default)]
pub(super) struct Observed {
    pub(super) registered: AtomicUsize,
    pub(super) pulled_bytes: AtomicU64,
    pub(super) pushed_bytes: AtomicU64,
    /// Time spent in model pulls and update pushes, summed over sites, in µs.
    pub(super) pull_micros: AtomicU64,
    pub(super) push_micros: AtomicU64,
    /// Each transfer's rate in GB/s, in the order they ended.
    pub(super) pull_rates: Mutex<Vec<f64>>,
    pub(super) push_rates: Mutex<Vec<f64>>,
    pub(super) refused: AtomicUsize,
    /// Values of pulled models that were not last round's model plus the
    /// sites' update (every site sends the same one).
    pub(super) model_mismatches: AtomicU64,
    pub(super) errors: Mutex<Vec<String>>,
    /// When the first site received round r's training task: round r's start.
    /// The final evaluation task is recorded as round `rounds + 1`.
    pub(super) round_started: Mutex<BTreeMap<u32, Instant>>,
}

impl Observed {
    fn started(&self, round: u32) {
        let mut started = meridian_sys::sync::lock(&self.round_started);
        started.entry(round).or_insert_with(Instant::now);
    }

    fn transfer(&self, rates: &Mutex<Vec<f64>>, bytes: usize, took: Duration) {
        let mut rates = meridian_sys::sync::lock(rates);
        rates.push(bytes as f64 / took.as_secs_f64().max(1e-9) / 1e9);
    }

    /// Records a site's error (the first ten).
    pub(super) fn error(&self, e: String) {
        let mut errors = meridian_sys::sync::lock(&self.errors);
        if errors.len() < 10 {
            errors.push(e);
        }
    }

    /// The errors recorded so far.
    pub(super) fn errors(&self) -> Vec<String> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

/// One simulated hospital: connect, register, then answer tasks until the
/// stream ends. At most `gate`'s permits of sites connect at once.
pub(super) async fn simulated_site(
    url: &str,
    name: &str,
    dir: &Path,
    observed: &Observed,
    gate: &tokio::sync::Semaphore,
) -> Result<()> {
    let permit = gate.acquire().await?;
    let identity = IdentityFiles::from_dir(dir)?;
    let channel = endpoint(url, &identity)?.connect().await?;
    let mut client = WorkerServiceClient::new(channel).max_decoding_message_size(4 << 20);
    // The worker's second connection for large models: opened on first use.
    let second = WorkerServiceClient::new(endpoint(url, &identity)?.connect_lazy()).max_decoding_message_size(4 << 20);
    register(&mut client).await?;
    let mut tasks = client.receive_tasks(pb::ReceiveTasksRequest {}).await?.into_inner();
    observed.registered.fetch_add(1, Ordering::Relaxed);
    drop(permit);
    let mut site =
        SimulatedSite { name, observed, client, second, spec_hash: String::new(), previous: None, used: Vec::new() };
    while let Some(task) = tasks.next().await {
        site.answer(task?).await?;
    }
    Ok(())
}

/// The coordinator at `url`, reached with mutual TLS as `identity`.
fn endpoint(url: &str, identity: &IdentityFiles) -> Result<Endpoint> {
    Ok(Endpoint::from_shared(url.to_string())?
        .tls_config(identity.client_tls())?
        .connect_timeout(Duration::from_secs(30))
        .max_frame_size(Some(meridian_wire::tensor::MAX_FRAME_BYTES)))
}

/// Registers the site's one dataset, "sim", with its released sizes.
async fn register(client: &mut WorkerServiceClient<Channel>) -> Result<()> {
    let mut columns = input_names();
    columns.push("y".to_string());
    client
        .register(pb::RegisterRequest {
            datasets: vec![pb::DatasetInfo {
                name: "sim".to_string(),
                numeric: columns[..INPUTS].to_vec(),
                columns,
                label: "y".to_string(),
                budget_epsilon: 1e6,
                budget_delta: 1e-5,
                job_epsilon_cap: 1e6,
                size: Some(pb::ReleasedSize { train_rows: EXAMPLES, test_rows: EXAMPLES, release: 1 }),
                ..Default::default()
            }],
            software_version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// A registered simulated site and what it keeps between tasks.
struct SimulatedSite<'a> {
    name: &'a str,
    observed: &'a Observed,
    client: WorkerServiceClient<Channel>,
    second: WorkerServiceClient<Channel>,
    /// The spec hash of the job it accepted, for its ledger entries.
    spec_hash: String,
    /// The last model pulled, kept to check the next one against, and up to
    /// two buffers the site has used before, which the next pull and the
    /// next update land in (see `meridian_wire::tensor::ChunkAssembler::reusing`): the worker pulls
    /// each round into its last pull's memory, and this site needs its last
    /// model for the check, so its second pull lands in its first update's.
    /// Only the first pull lands in fresh memory, as the worker's does.
    previous: Option<(u32, Vec<f32>)>,
    used: Vec<Vec<f32>>,
}

impl SimulatedSite<'_> {
    /// Answers one task.
    async fn answer(&mut self, task: pb::Task) -> Result<()> {
        match task.kind {
            Some(pb::task::Kind::Offer(offer)) => self.accept(&task.job_id, offer).await,
            Some(pb::task::Kind::Train(t)) => self.train(&task.job_id, &t).await,
            Some(pb::task::Kind::Evaluate(e)) => self.evaluate(&task.job_id, &e).await,
            Some(pb::task::Kind::Cancel(_)) | None => Ok(()),
        }
    }

    /// Accepts every offer.
    async fn accept(&mut self, job_id: &str, offer: pb::JobOffer) -> Result<()> {
        self.spec_hash.clone_from(&offer.spec_hash);
        self.client
            .answer_offer(pb::OfferAnswer {
                job_id: job_id.to_string(),
                spec_hash: offer.spec_hash,
                accept: true,
                train_examples: EXAMPLES,
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// A round: pulls the global model, checks it, and pushes the constant update.
    async fn train(&mut self, job_id: &str, t: &pb::TrainTask) -> Result<()> {
        self.observed.started(t.round);
        let model = self.pull(job_id, t).await?;
        if let Some((round, before)) = &self.previous
            && *round + 1 == t.round
        {
            check_aggregate(before, &model, self.name, t.round - 1, self.observed);
        }
        let mut update = self.used.pop().unwrap_or_default();
        update.clear();
        update.resize(model.len(), UPDATE_VALUE);
        let update = Arc::new(update);
        if let Some((_, before)) = self.previous.replace((t.round, model)) {
            self.used.push(before);
        }
        self.push(job_id, t, Arc::clone(&update)).await?;
        // Every chunk of it has been sent: its memory is free again.
        if let Ok(memory) = Arc::try_unwrap(update) {
            self.used.push(memory);
        }
        Ok(())
    }

    /// Pulls the model the round starts from, timing it.
    async fn pull(&mut self, job_id: &str, t: &pb::TrainTask) -> Result<Vec<f32>> {
        let pulled = Instant::now();
        let wanted = Wanted { job_id, round: t.round - 1, layout_hash: &t.layout_hash, num_params: t.num_params };
        let buffer = self.used.pop().unwrap_or_default();
        let model = pull_model(&mut self.client, &mut self.second, wanted, buffer, PULL_IDLE).await?;
        let pulled = pulled.elapsed();
        let observed = self.observed;
        observed.transfer(&observed.pull_rates, model.len() * 4, pulled);
        observed.pull_micros.fetch_add(pulled.as_micros() as u64, Ordering::Relaxed);
        observed.pulled_bytes.fetch_add(model.len() as u64 * 4, Ordering::Relaxed);
        Ok(model)
    }

    /// Pushes `update` as the worker does, timing it; a refusal is recorded.
    async fn push(&mut self, job_id: &str, t: &pb::TrainTask, update: Arc<Vec<f32>>) -> Result<()> {
        let header = pb::UpdateHeader {
            job_id: job_id.to_string(),
            round: t.round,
            layout_hash: t.layout_hash.clone(),
            num_params: t.num_params,
            num_examples: EXAMPLES,
            // A site whose policy releases exact metrics sends them
            // with each update (a large one's parts each carry them).
            exact_metrics: [("train_loss", 0.5), ("train_accuracy", 0.75), ("examples_seen", 100.0)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            ledger_entry: Some(pb::LedgerEntry {
                seq: u64::from(t.round),
                site: self.name.to_string(),
                job_id: job_id.to_string(),
                round: t.round,
                spec_hash: self.spec_hash.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let bytes = update.len() * 4;
        let pushed = Instant::now();
        // The worker's own upload: a reserved slot, then chunks made
        // as they are sent.
        let reply = push_reserved(&mut self.client, &mut self.second, header, update, None).await?;
        let pushed = pushed.elapsed();
        let observed = self.observed;
        observed.push_micros.fetch_add(pushed.as_micros() as u64, Ordering::Relaxed);
        if reply.accepted {
            observed.transfer(&observed.push_rates, bytes, pushed);
            observed.pushed_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        } else {
            observed.refused.fetch_add(1, Ordering::Relaxed);
            observed.error(format!("{}: update refused: {}", self.name, reply.reason));
        }
        Ok(())
    }

    /// Reports an all-zero evaluation histogram, with its ledger entry.
    async fn evaluate(&mut self, job_id: &str, e: &pb::EvaluateTask) -> Result<()> {
        self.observed.started(e.round + 1);
        self.client
            .report_evaluation(pb::EvaluationReport {
                job_id: job_id.to_string(),
                round: e.round,
                negatives: vec![0; EVALUATION_BINS],
                positives: vec![0; EVALUATION_BINS],
                ledger_entry: Some(pb::LedgerEntry {
                    seq: 1_000_000 + u64::from(e.round),
                    site: self.name.to_string(),
                    job_id: job_id.to_string(),
                    round: e.round,
                    spec_hash: self.spec_hash.clone(),
                    mechanism: meridian_wire::convert::mechanism_value(meridian_spec::mechanism::Mechanism::Evaluation),
                    ..Default::default()
                }),
                exact_metrics: Default::default(),
            })
            .await?;
        Ok(())
    }
}

/// Checks that the model of `round` is the previous one plus the update
/// every site sent (server learning rate 1): what the sites pulled, the
/// coordinator wrote, read back and averaged, value for value. The sum runs
/// in `f64` on the coordinator, so a value may differ by its last bit.
fn check_aggregate(before: &[f32], after: &[f32], site: &str, round: u32, observed: &Observed) {
    let off = |(b, a): (&f32, &f32)| {
        let want = (f64::from(*b) + f64::from(UPDATE_VALUE)) as f32;
        a.to_bits().abs_diff(want.to_bits()) > 1
    };
    let count =
        if before.len() == after.len() { before.iter().zip(after).filter(|&pair| off(pair)).count() } else { 1 };
    if count > 0 {
        observed.model_mismatches.fetch_add(count as u64, Ordering::Relaxed);
        let first =
            before.iter().zip(after).position(off).map(|i| format!("; value {i}: {} after {}", after[i], before[i]));
        observed.error(format!(
            "{site}: the model of round {round} is not the previous one plus the update in {count} values{}",
            first.unwrap_or_default()
        ));
    }
}
