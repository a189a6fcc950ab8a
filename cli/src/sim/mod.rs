//! `meridian sim`: a load generator for `BENCHMARKS.md`, not part of running
//! a federation. It drives the real coordinator daemon (a child process,
//! mutual TLS, SQLite state) through a job with many simulated hospitals in
//! one process, to measure what orchestration costs when training is taken
//! out: round time, time to the first round, bytes moved, and the
//! coordinator's memory as sites are added.
//!
//! Each simulated site (`site`) has its own certificate and connection and
//! speaks the worker protocol: it registers a dataset, accepts the offer,
//! pulls the global model every round and returns a constant update (the
//! "model plus a constant" client of Flower's own overhead benchmarks) with
//! a ledger entry shaped as the coordinator requires. There is no data, no
//! DP training and no ledger behind it: it measures the federation, not
//! privacy. `spec` holds the flags and the job, `report` what is printed.

mod report;
mod site;
mod spec;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use meridian_wire::pb;
use meridian_wire::pb::job_service_client::JobServiceClient;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use self::report::{Memory, Report, Timings, Transfers, rss};
use self::site::{Observed, simulated_site};
pub use self::spec::SimArgs;
use crate::client::{self, Connection};
use crate::local_federation::{Children, fresh_work_dir, start_coordinator, write_coordinator_config};
use crate::provision::{self, Provisioned};

/// Runs the simulation and prints what it measured.
pub async fn run(args: SimArgs) -> Result<()> {
    args.validate()?;
    let exe = std::env::current_exe().context("cannot find the meridian executable")?;
    let work = fresh_work_dir(&args.work_dir, "sim")?;
    let started = Instant::now();
    let ids = provision_sites(&work, args.sites)?;
    let provisioned = started.elapsed();
    let coord_dir = work.join("coordinator");
    std::fs::create_dir_all(&coord_dir)?;
    let config = coord_dir.join("coordinator.toml");
    let settings = format!("idle_timeout_secs = 60\nreceive_window_kib = {}", args.receive_window_kib);
    write_coordinator_config(&config, &ids.coordinator, &settings)?;
    let mut children = Children(Vec::new());
    let result = async {
        let url = start_coordinator(&exe, &coord_dir, &config, &mut children).await?;
        let pid = children.0[0].1.id().context("the coordinator exited at once")?;
        let sim = Simulation { args: &args, url, pid, ids: &ids, observed: Arc::new(Observed::default()) };
        sim.measure(provisioned).await
    }
    .await;
    children.stop().await;
    result
}

/// Provisions the simulated sites, `sim-0000` …, and one scientist.
fn provision_sites(work: &Path, sites: usize) -> Result<Provisioned> {
    provision::provision(&provision::Plan {
        out: work.join("federation"),
        coordinator_hosts: Vec::new(),
        sites: (0..sites).map(|i| format!("sim-{i:04}")).collect(),
        users: vec![("sim-scientist".to_string(), meridian_wire::identity::Role::Scientist)],
        stewards: Vec::new(),
        valid_days: 2,
    })
}

/// A simulation with its coordinator running.
struct Simulation<'a> {
    args: &'a SimArgs,
    /// The coordinator's URL and process id (for its memory).
    url: String,
    pid: u32,
    ids: &'a Provisioned,
    observed: Arc<Observed>,
}

impl Simulation<'_> {
    /// Connects every site, runs the job to its end, and prints the report.
    async fn measure(&self, provisioned: Duration) -> Result<()> {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (rss_idle, _) = rss(self.pid).context("cannot read the coordinator's memory from /proc")?;
        let connect = Instant::now();
        let mut sites = self.connect_sites().await?;
        let connected = connect.elapsed();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (rss_connected, _) = rss(self.pid).unwrap_or((0, 0));
        let (spec, num_params) = spec::job_spec(self.args.rounds, self.args.params);
        let scientist = Connection { coordinator: self.url.clone(), identity: self.ids.users[0].1.clone() };
        let mut jobs = scientist.jobs().await?;
        let submitted = Instant::now();
        let (final_state, rss_max) = self.run_job(&mut jobs, spec, submitted, rss_connected).await?;
        let job = submitted.elapsed();
        let (_, rss_peak) = rss(self.pid).unwrap_or((0, rss_max));
        sites.abort_all();
        if final_state.state != "completed" {
            bail!("the job ended {}: {}", final_state.state, final_state.reason);
        }
        let (first_round, median_round_secs) = self.round_times(submitted)?;
        let report = Report {
            sites: self.args.sites,
            rounds: self.args.rounds,
            num_params,
            url: self.url.clone(),
            timings: Timings { provisioned, connected, first_round, median_round_secs, job },
            memory: Memory { idle: rss_idle, connected: rss_connected, peak: rss_peak },
            transfers: Transfers::of(&self.observed),
            errors: self.observed.errors(),
            observed: &self.observed,
        };
        report.print(self.args.json)
    }

    /// Starts every simulated site (at most 32 connecting at once) and
    /// waits until all have registered, for up to 300 s.
    async fn connect_sites(&self) -> Result<JoinSet<()>> {
        let gate = Arc::new(tokio::sync::Semaphore::new(32));
        let mut sites = JoinSet::new();
        for (name, dir) in self.ids.sites.clone() {
            let (url, observed, gate) = (self.url.clone(), Arc::clone(&self.observed), Arc::clone(&gate));
            sites.spawn(async move {
                if let Err(e) = simulated_site(&url, &name, &dir, &observed, &gate).await {
                    observed.error(format!("{name}: {e:#}"));
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.observed.registered.load(Ordering::Relaxed) < self.args.sites {
            if Instant::now() > deadline {
                bail!(
                    "only {} of {} sites registered in 300 s: {:?}",
                    self.observed.registered.load(Ordering::Relaxed),
                    self.args.sites,
                    self.observed.errors()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(sites)
    }

    /// Submits the job (at `submitted`) and polls it until it ends, for up
    /// to 30 minutes, and the coordinator's memory with it; returns the
    /// final status and the largest memory seen, starting from `rss_connected`.
    async fn run_job(
        &self,
        jobs: &mut JobServiceClient<Channel>,
        spec: String,
        submitted: Instant,
        rss_connected: u64,
    ) -> Result<(pb::JobStatus, u64)> {
        let job_id = jobs
            .submit_job(pb::SubmitJobRequest { spec_toml: spec })
            .await
            .map_err(client::status_error)?
            .into_inner()
            .job_id;
        // Poll the job's state and the coordinator's memory; round times come
        // from when the sites received their tasks, not from this polling.
        let mut rss_max = rss_connected;
        loop {
            let status = jobs
                .get_job(pb::GetJobRequest { job_id: job_id.clone() })
                .await
                .map_err(client::status_error)?
                .into_inner();
            if let Some((now, _)) = rss(self.pid) {
                rss_max = rss_max.max(now);
            }
            if matches!(status.state.as_str(), "completed" | "failed" | "cancelled") {
                return Ok((status, rss_max));
            }
            if submitted.elapsed() > Duration::from_secs(1800) {
                bail!("the job did not finish in 30 minutes (state {})", status.state);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Round 1's end after `submitted`, and the median round in seconds:
    /// round r ran from its first training task to round r + 1's (or the
    /// evaluation's).
    fn round_times(&self, submitted: Instant) -> Result<(Duration, f64)> {
        let rounds = self.args.rounds;
        let started = self.observed.round_started.lock().map(|s| s.clone()).unwrap_or_default();
        let ends: Vec<Duration> = (2..=rounds + 1)
            .map(|r| started.get(&r).map(|t| t.duration_since(submitted)))
            .collect::<Option<_>>()
            .context("a round's tasks were never seen")?;
        let mut per_round: Vec<f64> = (1..=rounds).map(|r| (started[&(r + 1)] - started[&r]).as_secs_f64()).collect();
        per_round.sort_by(f64::total_cmp);
        Ok((ends[0], per_round[per_round.len() / 2]))
    }
}
