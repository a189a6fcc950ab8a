//! `meridian sim`: a federation of many simulated hospitals in one process,
//! driving the real coordinator daemon (a child process, mutual TLS, SQLite
//! state) through a job, to measure what orchestration costs when training
//! is taken out: round time, time to the first round, bytes moved, and the
//! coordinator's memory as sites are added.
//!
//! Each simulated site has its own certificate and connection and speaks the
//! worker protocol: it registers a dataset, accepts the offer, pulls the
//! global model every round and returns a constant update (the "model plus a
//! constant" client of Flower's own overhead benchmarks) with a ledger entry
//! shaped as the coordinator requires. There is no data, no DP training and
//! no ledger behind it: it measures the federation, not privacy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use proto::identity::IdentityFiles;
use proto::pb;
use proto::pb::worker_service_client::WorkerServiceClient;
use tonic::transport::Endpoint;
use worker::download::{Wanted, pull_model};
use worker::upload::push_reserved;

use crate::demo::{Children, path_str, spawn, wait_for_file, write_coordinator_config};
use crate::provision;

/// Inputs of the simulated sites' MLP (`x000` … `x099`).
const INPUTS: usize = 100;
/// Training examples each simulated site declares (its FedAvg weight).
const EXAMPLES: u64 = 100;
/// Score bins of the simulated job's evaluation (the spec's default).
const EVALUATION_BINS: usize = proto::job::EvaluationSpec::DEFAULT_BINS;
/// Every value of every simulated update.
const UPDATE_VALUE: f32 = 1e-3;

/// How long a model stream may stay silent before the pull fails.
const PULL_IDLE: Duration = Duration::from_secs(60);

/// `meridian sim` options.
#[derive(clap::Args, Debug)]
pub struct SimArgs {
    /// Simulated hospitals, each with its own certificate and connection.
    #[arg(long, default_value_t = 100)]
    sites: usize,
    /// Rounds of the job.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Model size in parameters (approximately: an MLP 100-h-2 with h chosen to match).
    #[arg(long, default_value_t = 100_000)]
    params: u64,
    /// The coordinator's HTTP/2 receive window in KiB (`receive_window_kib`).
    #[arg(long, default_value_t = 1024)]
    receive_window_kib: u32,
    /// Where the federation's files go (emptied first if it holds an earlier sim).
    #[arg(long, default_value = "meridian-sim")]
    work_dir: PathBuf,
    /// Print the results as one JSON object.
    #[arg(long)]
    json: bool,
}

/// What the simulated sites observed, shared between them.
#[derive(Default)]
struct Observed {
    registered: AtomicUsize,
    pulled_bytes: AtomicU64,
    pushed_bytes: AtomicU64,
    /// Time spent in model pulls and update pushes, summed over sites, in µs.
    pull_micros: AtomicU64,
    push_micros: AtomicU64,
    /// Each transfer's rate in GB/s, in the order they ended.
    pull_rates: Mutex<Vec<f64>>,
    push_rates: Mutex<Vec<f64>>,
    refused: AtomicUsize,
    /// Values of pulled models that were not last round's model plus the
    /// sites' update (every site sends the same one).
    model_mismatches: AtomicU64,
    errors: Mutex<Vec<String>>,
    /// When the first site received round r's training task: round r's start.
    /// The final evaluation task is recorded as round `rounds + 1`.
    round_started: Mutex<BTreeMap<u32, Instant>>,
}

impl Observed {
    fn started(&self, round: u32) {
        let mut started = self.round_started.lock().unwrap_or_else(|e| e.into_inner());
        started.entry(round).or_insert_with(Instant::now);
    }

    fn transfer(&self, rates: &Mutex<Vec<f64>>, bytes: usize, took: Duration) {
        let mut rates = rates.lock().unwrap_or_else(|e| e.into_inner());
        rates.push(bytes as f64 / took.as_secs_f64().max(1e-9) / 1e9);
    }

    fn error(&self, e: String) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if errors.len() < 10 {
            errors.push(e);
        }
    }
}

/// The coordinator's resident memory in bytes, and its peak, from `/proc`.
fn rss(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// The job every simulated site serves: an MLP 100-h-2 of about `params`
/// parameters, or 100-h-h-2 when one hidden layer would be wider than a
/// job spec allows.
fn job_spec(rounds: u32, params: u64) -> (String, u64) {
    let inputs = INPUTS as u64;
    // One layer: (inputs + 1)·h + 2·h + 2 parameters.
    let one = (params.saturating_sub(2) / (inputs + 3)).max(1);
    let (hidden, exact) = if one <= 65_536 {
        (format!("[{one}]"), (inputs + 3) * one + 2)
    } else {
        // Two layers: (inputs + 1)·h + (h + 1)·h + 2·h + 2 = h² + (inputs + 4)·h + 2.
        let b = (inputs + 4) as f64;
        let h = ((-b + (b * b + 4.0 * (params - 2) as f64).sqrt()) / 2.0).floor() as u64;
        (format!("[{h}, {h}]"), h * h + (inputs + 4) * h + 2)
    };
    let numeric: Vec<String> = (0..INPUTS).map(|i| format!("x{i:03}")).collect();
    let text = format!(
        r#"name = "sim"
dataset = "sim"
[model]
kind = "mlp"
hidden = {hidden}
[features]
label = "y"
positive_label = "1"
negative_labels = ["0"]
numeric = {numeric:?}
[training]
rounds = {rounds}
local_epochs = 1.0
batch_size = 32
learning_rate = 0.1
server_learning_rate = 1.0
[privacy]
noise_multiplier = 1.0
clip_norm = 1.0
delta = 1e-5
[policy]
min_sites = 1
round_deadline_secs = 600
max_round_attempts = 1
"#
    );
    (text, exact)
}

/// Runs the simulation and prints what it measured.
pub async fn run(args: SimArgs) -> Result<()> {
    if args.sites == 0 || args.rounds == 0 || args.params < 1_000 {
        bail!("--sites and --rounds must be at least 1 and --params at least 1000");
    }
    let exe = std::env::current_exe().context("cannot find the meridian executable")?;
    let work = args.work_dir.clone();
    if work.exists() {
        if !work.join(".meridian-sim").exists() && std::fs::read_dir(&work)?.next().is_some() {
            bail!(
                "{} exists and is not an earlier sim; choose another --work-dir",
                work.display()
            );
        }
        std::fs::remove_dir_all(&work)
            .with_context(|| format!("cannot empty {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    std::fs::write(work.join(".meridian-sim"), "")?;
    let work = work.canonicalize()?;
    let (spec, num_params) = job_spec(args.rounds, args.params);

    let started = Instant::now();
    let names: Vec<String> = (0..args.sites).map(|i| format!("sim-{i:04}")).collect();
    let ids = provision::provision(&provision::Plan {
        out: work.join("federation"),
        coordinator_hosts: Vec::new(),
        sites: names.clone(),
        users: vec![(
            "sim-scientist".to_string(),
            proto::identity::Role::Scientist,
        )],
        valid_days: 2,
    })?;
    let provisioned = started.elapsed();

    let coord_dir = work.join("coordinator");
    std::fs::create_dir_all(&coord_dir)?;
    let config = coord_dir.join("coordinator.toml");
    let settings = format!(
        "idle_timeout_secs = 60\nreceive_window_kib = {}",
        args.receive_window_kib
    );
    write_coordinator_config(&config, &ids.coordinator, &settings)?;
    let ready = coord_dir.join("address");
    let mut children = Children(Vec::new());
    let result = async {
        let coord_args = ["coordinator", "--config", path_str(&config)?, "--ready-file", path_str(&ready)?];
        let log = coord_dir.join("coordinator.log");
        children.0.push(("coordinator".to_string(), spawn(&exe, &coord_args, &log, "coordinator")?));
        let pid = children.0[0].1.id().context("the coordinator exited at once")?;
        let url = format!("https://{}", wait_for_file(&ready, Duration::from_secs(30), &mut children).await?);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (rss_idle, _) = rss(pid).context("cannot read the coordinator's memory from /proc")?;

        let observed = Arc::new(Observed::default());
        let connect = Instant::now();
        let gate = Arc::new(tokio::sync::Semaphore::new(32));
        let mut sites = tokio::task::JoinSet::new();
        for (name, dir) in ids.sites.clone() {
            let (url, observed, gate) = (url.clone(), Arc::clone(&observed), Arc::clone(&gate));
            sites.spawn(async move {
                if let Err(e) = simulated_site(&url, &name, &dir, &observed, &gate).await {
                    observed.error(format!("{name}: {e:#}"));
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        while observed.registered.load(Ordering::Relaxed) < args.sites {
            if Instant::now() > deadline {
                bail!("only {} of {} sites registered in 300 s: {:?}", observed.registered.load(Ordering::Relaxed), args.sites, observed.errors.lock().map(|e| e.clone()).unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let connected = connect.elapsed();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (rss_connected, _) = rss(pid).unwrap_or((0, 0));

        let scientist = crate::client::Connection { coordinator: url.clone(), identity: ids.users[0].1.clone() };
        let mut jobs = scientist.jobs().await?;
        let submitted = Instant::now();
        let job_id = jobs
            .submit_job(pb::SubmitJobRequest { spec_toml: spec.clone() })
            .await
            .map_err(crate::client::status_error)?
            .into_inner()
            .job_id;
        // Poll the job's state and the coordinator's memory; round times come
        // from when the sites received their tasks, not from this polling.
        let mut rss_max = rss_connected;
        let final_state = loop {
            let status = jobs
                .get_job(pb::GetJobRequest { job_id: job_id.clone() })
                .await
                .map_err(crate::client::status_error)?
                .into_inner();
            if let Some((now, _)) = rss(pid) {
                rss_max = rss_max.max(now);
            }
            if matches!(status.state.as_str(), "completed" | "failed" | "cancelled") {
                break status;
            }
            if submitted.elapsed() > Duration::from_secs(1800) {
                bail!("the job did not finish in 30 minutes (state {})", status.state);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let total = submitted.elapsed();
        let (_, rss_peak) = rss(pid).unwrap_or((0, rss_max));
        sites.abort_all();
        if final_state.state != "completed" {
            bail!("the job ended {}: {}", final_state.state, final_state.reason);
        }
        let started = observed.round_started.lock().map(|s| s.clone()).unwrap_or_default();
        // Round r ran from its first training task to round r + 1's (or the evaluation's).
        let ends: Vec<Duration> = (2..=args.rounds + 1)
            .map(|r| started.get(&r).map(|t| t.duration_since(submitted)))
            .collect::<Option<_>>()
            .context("a round's tasks were never seen")?;
        let first_round = ends[0];
        let mut per_round: Vec<f64> = (1..=args.rounds)
            .map(|r| (started[&(r + 1)] - started[&r]).as_secs_f64())
            .collect();
        per_round.sort_by(f64::total_cmp);
        let median_round = per_round[per_round.len() / 2];
        let pulled = observed.pulled_bytes.load(Ordering::Relaxed);
        let pushed = observed.pushed_bytes.load(Ordering::Relaxed);
        let rate = |bytes: u64, micros: &AtomicU64| bytes as f64 / (micros.load(Ordering::Relaxed).max(1) as f64 / 1e6);
        let (pull_rate, push_rate) = (rate(pulled, &observed.pull_micros), rate(pushed, &observed.push_micros));
        let growth_per_100 = (rss_peak.saturating_sub(rss_idle)) as f64 / args.sites as f64 * 100.0;
        let errors = observed.errors.lock().map(|e| e.clone()).unwrap_or_default();
        let pull_rates = observed.pull_rates.lock().map(|r| r.clone()).unwrap_or_default();
        let push_rates = observed.push_rates.lock().map(|r| r.clone()).unwrap_or_default();
        let list = |rates: &[f64]| rates.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", ");
        if args.json {
            crate::out!(
                "{}",
                serde_json::json!({
                    "sites": args.sites, "rounds": args.rounds, "params": num_params,
                    "provision_s": provisioned.as_secs_f64(), "connect_s": connected.as_secs_f64(),
                    "first_round_s": first_round.as_secs_f64(), "median_round_s": median_round,
                    "job_s": total.as_secs_f64(),
                    "coordinator_rss_idle_mb": mb(rss_idle), "coordinator_rss_connected_mb": mb(rss_connected),
                    "coordinator_rss_peak_mb": mb(rss_peak), "rss_growth_mb_per_100_sites": mb(growth_per_100 as u64),
                    "pulled_mb": mb(pulled), "pushed_mb": mb(pushed),
                    "pull_gb_per_s_per_transfer": pull_rate / 1e9, "push_gb_per_s_per_transfer": push_rate / 1e9,
                    "pull_gb_per_s_each": pull_rates, "push_gb_per_s_each": push_rates,
                    "model_mismatches": observed.model_mismatches.load(Ordering::Relaxed), "refused_updates": observed.refused.load(Ordering::Relaxed),
                    "errors": errors,
                })
            )?;
        } else {
            crate::out!("meridian sim: {} simulated hospitals, {} rounds, {num_params} parameters, coordinator on {url}", args.sites, args.rounds)?;
            crate::out!("  provisioned {} certificates in {:.2} s; all sites registered over mTLS in {:.2} s", args.sites + 2, provisioned.as_secs_f64(), connected.as_secs_f64())?;
            crate::out!("  round 1 closed {:.3} s after submission; then {:.3} s per round (median); job complete in {:.2} s", first_round.as_secs_f64(), median_round, total.as_secs_f64())?;
            if args.sites == 1 {
                crate::out!(
                    "  moved {:.1} MB of models to the site at {:.2} GB/s and {:.1} MB of updates back at {:.2} GB/s (acknowledged once durable on the coordinator's disk)",
                    mb(pulled),
                    pull_rate / 1e9,
                    mb(pushed),
                    push_rate / 1e9
                )?;
                crate::out!("  each pull, GB/s: {}; each push: {}", list(&pull_rates), list(&push_rates))?;
            } else {
                crate::out!("  moved {:.1} MB of models to sites and {:.1} MB of updates back", mb(pulled), mb(pushed))?;
            }
            crate::out!(
                "  coordinator RSS: {:.1} MB idle, {:.1} MB with the sites connected, {:.1} MB peak: {:.2} MB per 100 sites",
                mb(rss_idle), mb(rss_connected), mb(rss_peak), mb(growth_per_100 as u64)
            )?;
            if !errors.is_empty() {
                crate::out!("  site errors: {errors:?}")?;
            }
        }
        Ok(())
    }
    .await;
    children.stop().await;
    result
}

/// One simulated hospital: connect, register, then answer tasks until the stream ends.
async fn simulated_site(
    url: &str,
    name: &str,
    dir: &Path,
    observed: &Observed,
    gate: &tokio::sync::Semaphore,
) -> Result<()> {
    let permit = gate.acquire().await?;
    let identity = IdentityFiles::from_dir(dir)?;
    let channel = Endpoint::from_shared(url.to_string())?
        .tls_config(identity.client_tls())?
        .connect_timeout(Duration::from_secs(30))
        .max_frame_size(Some(proto::tensor::MAX_FRAME_BYTES))
        .connect()
        .await?;
    let mut client = WorkerServiceClient::new(channel).max_decoding_message_size(4 << 20);
    // The worker's second connection for large models: opened on first use.
    let mut second = WorkerServiceClient::new(
        Endpoint::from_shared(url.to_string())?
            .tls_config(identity.client_tls())?
            .connect_timeout(Duration::from_secs(30))
            .max_frame_size(Some(proto::tensor::MAX_FRAME_BYTES))
            .connect_lazy(),
    )
    .max_decoding_message_size(4 << 20);
    let mut columns: Vec<String> = (0..INPUTS).map(|i| format!("x{i:03}")).collect();
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
    let mut tasks = client
        .receive_tasks(pb::ReceiveTasksRequest {})
        .await?
        .into_inner();
    observed.registered.fetch_add(1, Ordering::Relaxed);
    drop(permit);
    let mut spec_hash = String::new();
    // The last model pulled, kept to check the next one against, and up to
    // two buffers the site has used before, which the next pull and the
    // next update land in (see `proto::tensor::ChunkAssembler::reusing`): the worker pulls
    // each round into its last pull's memory, and this site needs its last
    // model for the check, so its second pull lands in its first update's.
    // Only the first pull lands in fresh memory, as the worker's does.
    let mut previous: Option<(u32, Vec<f32>)> = None;
    let mut used: Vec<Vec<f32>> = Vec::new();
    while let Some(task) = tasks.next().await {
        let task = task?;
        match task.kind {
            Some(pb::task::Kind::Offer(offer)) => {
                spec_hash = offer.spec_hash.clone();
                client
                    .answer_offer(pb::OfferAnswer {
                        job_id: task.job_id.clone(),
                        spec_hash: offer.spec_hash,
                        accept: true,
                        train_examples: EXAMPLES,
                        ..Default::default()
                    })
                    .await?;
            }
            Some(pb::task::Kind::Train(t)) => {
                observed.started(t.round);
                let pulled = Instant::now();
                let wanted = Wanted {
                    job_id: &task.job_id,
                    round: t.round - 1,
                    layout_hash: &t.layout_hash,
                    num_params: t.num_params,
                };
                let buffer = used.pop().unwrap_or_default();
                let model = pull_model(&mut client, &mut second, wanted, buffer, PULL_IDLE).await?;
                let pulled = pulled.elapsed();
                observed.transfer(&observed.pull_rates, model.len() * 4, pulled);
                observed
                    .pull_micros
                    .fetch_add(pulled.as_micros() as u64, Ordering::Relaxed);
                observed
                    .pulled_bytes
                    .fetch_add(model.len() as u64 * 4, Ordering::Relaxed);
                if let Some((round, before)) = &previous
                    && *round + 1 == t.round
                {
                    check_aggregate(before, &model, name, t.round - 1, observed);
                }
                let mut update = used.pop().unwrap_or_default();
                update.clear();
                update.resize(model.len(), UPDATE_VALUE);
                let update = Arc::new(update);
                if let Some((_, before)) = previous.replace((t.round, model)) {
                    used.push(before);
                }
                let header = pb::UpdateHeader {
                    job_id: task.job_id.clone(),
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
                        site: name.to_string(),
                        job_id: task.job_id.clone(),
                        round: t.round,
                        spec_hash: spec_hash.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let pushed = Instant::now();
                // The worker's own upload: a reserved slot, then chunks made
                // as they are sent.
                let reply = push_reserved(&mut client, &mut second, header, Arc::clone(&update), None).await?;
                let pushed = pushed.elapsed();
                observed
                    .push_micros
                    .fetch_add(pushed.as_micros() as u64, Ordering::Relaxed);
                if reply.accepted {
                    observed.transfer(&observed.push_rates, update.len() * 4, pushed);
                    observed
                        .pushed_bytes
                        .fetch_add(update.len() as u64 * 4, Ordering::Relaxed);
                } else {
                    observed.refused.fetch_add(1, Ordering::Relaxed);
                    observed.error(format!("{name}: update refused: {}", reply.reason));
                }
                // Every chunk of it has been sent: its memory is free again.
                if let Ok(memory) = Arc::try_unwrap(update) {
                    used.push(memory);
                }
            }
            Some(pb::task::Kind::Evaluate(e)) => {
                observed.started(e.round + 1);
                client
                    .report_evaluation(pb::EvaluationReport {
                        job_id: task.job_id.clone(),
                        round: e.round,
                        negatives: vec![0; EVALUATION_BINS],
                        positives: vec![0; EVALUATION_BINS],
                        ledger_entry: Some(pb::LedgerEntry {
                            seq: 1_000_000 + u64::from(e.round),
                            site: name.to_string(),
                            job_id: task.job_id.clone(),
                            round: e.round,
                            spec_hash: spec_hash.clone(),
                            mechanism: proto::mechanism::Mechanism::Evaluation.to_wire(),
                            ..Default::default()
                        }),
                        exact_metrics: Default::default(),
                    })
                    .await?;
            }
            Some(pb::task::Kind::Cancel(_)) | None => {}
        }
    }
    Ok(())
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
    let count = if before.len() == after.len() {
        before.iter().zip(after).filter(|&pair| off(pair)).count()
    } else {
        1
    };
    if count > 0 {
        observed
            .model_mismatches
            .fetch_add(count as u64, Ordering::Relaxed);
        let first = before
            .iter()
            .zip(after)
            .position(off)
            .map(|i| format!("; value {i}: {} after {}", after[i], before[i]));
        observed.error(format!(
            "{site}: the model of round {round} is not the previous one plus the update in {count} values{}",
            first.unwrap_or_default()
        ));
    }
}
