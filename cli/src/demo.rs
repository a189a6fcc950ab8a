//! `meridian demo`: a whole federation on this machine. It provisions a CA
//! and certificates, splits a real dataset between three hospitals, starts
//! the coordinator and three workers as separate processes on 127.0.0.1
//! (mutual TLS, each with its own SQLite state), submits a DP-SGD job as a
//! scientist, shows its progress, and ends with the per-round AUC, the ε
//! each hospital spent and where everything is. Child processes die with
//! the demo, also on Ctrl-C.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use meridian_wire::pb;
use rand::SeedableRng;
use rand::seq::SliceRandom;

use crate::client::{self, Connection};
use crate::local_federation::{Children, fresh_work_dir, path_str, spawn, start_coordinator, write_coordinator_config};
use crate::provision::{self, Provisioned};
use crate::{out, output};

const BRFSS_GZ: &[u8] = include_bytes!("../../examples/data/brfss_heart_2020.csv.gz");
const WDBC_CSV: &[u8] = include_bytes!("../../examples/data/wdbc_breast_cancer.csv");
const BRFSS_JOB: &str = include_str!("../../examples/jobs/brfss.toml");
const WDBC_JOB: &str = include_str!("../../examples/jobs/wdbc.toml");
const SITES: [&str; 3] = ["hospital-a", "hospital-b", "hospital-c"];

/// Which dataset the demo federates.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DemoDataset {
    /// CDC BRFSS 2020 heart disease survey, 287,959 records.
    Brfss,
    /// Wisconsin diagnostic breast cancer, 569 records.
    Wdbc,
}

/// Options of `meridian demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// The dataset to split between the three hospitals.
    #[arg(long, value_enum, default_value = "brfss")]
    dataset: DemoDataset,
    /// Where the federation's files go (emptied first if it holds an earlier demo).
    #[arg(long, default_value = "meridian-demo")]
    work_dir: PathBuf,
    /// Print less: no progress bar.
    #[arg(long)]
    quiet: bool,
}

/// What the demo federates and what each hospital allows on it.
struct Dataset {
    name: &'static str,
    /// Each hospital's total ε budget and per-job cap for this dataset.
    budget_epsilon: f64,
    job_epsilon_cap: f64,
    /// The noise on each hospital's released training and test sizes.
    size_noise_scale: f64,
    job: &'static str,
    label: &'static str,
    numeric: Vec<String>,
    categorical: Vec<String>,
}

impl Dataset {
    /// The dataset of `kind`, its columns taken from its example job.
    fn of(kind: DemoDataset) -> Result<Dataset> {
        Ok(match kind {
            DemoDataset::Brfss => {
                let job =
                    meridian_spec::job::JobSpec::from_toml(BRFSS_JOB, "brfss.toml").map_err(anyhow::Error::msg)?;
                Dataset {
                    name: "brfss",
                    budget_epsilon: 5.0,
                    job_epsilon_cap: 2.0,
                    size_noise_scale: 50.0,
                    job: BRFSS_JOB,
                    label: "HeartDisease",
                    numeric: job.features.numeric.clone(),
                    categorical: job.features.categorical.iter().map(|c| c.column.clone()).collect(),
                }
            }
            DemoDataset::Wdbc => {
                let job = meridian_spec::job::JobSpec::from_toml(WDBC_JOB, "wdbc.toml").map_err(anyhow::Error::msg)?;
                // 190 records per hospital: any useful model costs a large ε.
                Dataset {
                    name: "wdbc",
                    budget_epsilon: 30.0,
                    job_epsilon_cap: 15.0,
                    size_noise_scale: 3.0,
                    job: WDBC_JOB,
                    label: "diagnosis",
                    numeric: job.features.numeric.clone(),
                    categorical: Vec::new(),
                }
            }
        })
    }

    /// The file name of each hospital's share of it.
    fn file_name(&self) -> String {
        format!("{}.csv.gz", self.name)
    }
}

/// Where the demo's files go, under its work directory.
struct Layout {
    work: PathBuf,
    federation: PathBuf,
    coordinator: PathBuf,
    /// Each hospital's directory, in the order of `SITES`.
    sites: Vec<PathBuf>,
    job_file: PathBuf,
    model: PathBuf,
}

impl Layout {
    fn new(work: PathBuf) -> Layout {
        Layout {
            federation: work.join("federation"),
            coordinator: work.join("coordinator"),
            sites: SITES.iter().map(|s| work.join(s)).collect(),
            job_file: work.join("job.toml"),
            model: work.join("model.safetensors"),
            work,
        }
    }

    fn coordinator_config(&self) -> PathBuf {
        self.coordinator.join("coordinator.toml")
    }

    fn ledger(site_dir: &Path) -> PathBuf {
        site_dir.join("state").join("ledger.sqlite")
    }
}

/// Splits the rows of a CSV between the sites after a seeded shuffle; writes gzip files.
fn partition(csv_bytes: &[u8], gz: bool, dirs: &[PathBuf], file_name: &str) -> Result<Vec<usize>> {
    let text = if gz {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(csv_bytes), &mut s)?;
        s
    } else {
        String::from_utf8(csv_bytes.to_vec())?
    };
    let mut lines = text.lines();
    let header = lines.next().context("the dataset is empty")?;
    let mut rows: Vec<&str> = lines.filter(|l| !l.trim().is_empty()).collect();
    rows.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(2020));
    let mut counts = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(file_name);
        let file = std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::fast());
        writeln!(w, "{header}")?;
        let mut n = 0;
        for row in rows.iter().skip(i).step_by(dirs.len()) {
            writeln!(w, "{row}")?;
            n += 1;
        }
        w.finish()?.flush()?;
        counts.push(n);
    }
    Ok(counts)
}

fn toml_list(items: &[String]) -> String {
    format!("[{}]", items.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", "))
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let exe = std::env::current_exe().context("cannot find the meridian executable")?;
    let layout = Layout::new(fresh_work_dir(&args.work_dir, "demo")?);
    let dataset = Dataset::of(args.dataset)?;
    out!(
        "Meridian demo: 1 coordinator + 3 hospitals on 127.0.0.1, dataset {}, work dir {}",
        dataset.name,
        layout.work.display()
    )?;
    let ids = provision_federation(&layout.federation)?;
    out!("  provisioned a CA and mutual-TLS certificates in {}", layout.federation.display())?;
    split_dataset(args.dataset, &dataset, &layout)?;
    std::fs::create_dir_all(&layout.coordinator)?;
    write_coordinator_config(&layout.coordinator_config(), &ids.coordinator, "idle_timeout_secs = 30")?;
    let demo = Demo { exe, quiet: args.quiet, started, dataset, layout, ids };
    let mut children = Children(Vec::new());
    let outcome = tokio::select! {
        r = demo.federate(&mut children) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    children.stop().await;
    match &outcome {
        Ok(()) => out!("\nall processes stopped; demo finished in {:.0} s", started.elapsed().as_secs_f64())?,
        Err(_) => eprintln!("all processes stopped; logs are in {}", demo.layout.work.display()),
    }
    outcome
}

/// The CA and certificates: one per hospital, the scientist alice and the reviewer rita.
fn provision_federation(dir: &Path) -> Result<Provisioned> {
    provision::provision(&provision::Plan {
        out: dir.to_path_buf(),
        coordinator_hosts: Vec::new(),
        sites: SITES.iter().map(|s| s.to_string()).collect(),
        users: vec![
            ("alice".to_string(), meridian_wire::identity::Role::Scientist),
            ("rita".to_string(), meridian_wire::identity::Role::Reviewer),
        ],
        stewards: Vec::new(),
        valid_days: 30,
    })
}

/// Gives each hospital its share of the dataset, in its `data/`.
fn split_dataset(kind: DemoDataset, dataset: &Dataset, layout: &Layout) -> Result<()> {
    let data_dirs: Vec<PathBuf> = layout.sites.iter().map(|d| d.join("data")).collect();
    let counts = match kind {
        DemoDataset::Brfss => partition(BRFSS_GZ, true, &data_dirs, &dataset.file_name())?,
        DemoDataset::Wdbc => partition(WDBC_CSV, false, &data_dirs, &dataset.file_name())?,
    };
    for (s, n) in SITES.iter().zip(&counts) {
        out!("  {s}: {n} patient records (they never leave {s})")?;
    }
    Ok(())
}

/// A prepared demo: the federation provisioned, the data split, the
/// coordinator configured; its daemons not yet started.
struct Demo {
    exe: PathBuf,
    quiet: bool,
    started: Instant,
    dataset: Dataset,
    layout: Layout,
    ids: Provisioned,
}

impl Demo {
    /// Starts the daemons as `children`, runs the job to its end as alice,
    /// and reports what it trained, what it cost and where everything is.
    async fn federate(&self, children: &mut Children) -> Result<()> {
        let layout = &self.layout;
        let url = start_coordinator(&self.exe, &layout.coordinator, &layout.coordinator_config(), children).await?;
        out!("  coordinator listening on {url} (log: {})", layout.coordinator.join("coordinator.log").display())?;
        self.start_workers(&url, children)?;
        out!("  3 hospital workers started (logs: <site>/worker.log)")?;
        let scientist = self.user(&url, "alice");
        std::fs::write(&layout.job_file, self.dataset.job)?;
        let job_id = submit_when_registered(&scientist, &layout.job_file).await?;
        out!("\nalice (scientist) submitted job {job_id} from {}", layout.job_file.display())?;
        let status = client::watch(&scientist, &job_id, self.watch_output()).await?;
        out!("")?;
        output::block(&client::render_status(&status))?;
        if status.state != "completed" {
            bail!("job {job_id} ended {}: {}", status.state, status.reason);
        }
        let (round, n) = client::pull_model(&scientist, &job_id, None, &layout.model).await?;
        let budgets = client::budgets(&self.user(&url, "rita")).await?;
        print_results(&status, &budgets)?;
        out!("  model (round {round}, {n} parameters): {}", layout.model.display())?;
        self.print_locations(&url)?;
        self.write_summary(&status, &budgets)
    }

    /// A connection to the coordinator at `url` as the user `name`.
    fn user(&self, url: &str, name: &str) -> Connection {
        Connection { coordinator: url.to_string(), identity: self.layout.federation.join("users").join(name) }
    }

    /// How the job's progress is shown: not at all with `--quiet`, else as the terminal allows.
    fn watch_output(&self) -> client::WatchOutput {
        if self.quiet {
            client::WatchOutput::Quiet
        } else if output::progress_bar() {
            client::WatchOutput::Terminal
        } else {
            client::WatchOutput::Lines
        }
    }

    /// Writes each hospital's worker.toml and starts its worker.
    fn start_workers(&self, url: &str, children: &mut Children) -> Result<()> {
        for ((site, dir), (_, id)) in SITES.iter().zip(&self.layout.sites).zip(&self.ids.sites) {
            let cfg = dir.join("worker.toml");
            std::fs::write(&cfg, self.worker_config(url, id))?;
            let wargs = ["worker", "--config", path_str(&cfg)?];
            children.0.push((site.to_string(), spawn(&self.exe, &wargs, &dir.join("worker.log"), site)?));
        }
        Ok(())
    }

    /// A hospital's worker.toml: the coordinator at `url`, the identity in
    /// `id`, and its share of the dataset with the demo's budgets.
    fn worker_config(&self, url: &str, id: &Path) -> String {
        let d = &self.dataset;
        format!(
            "coordinator = {url:?}\ndata_dir = \"state\"\ndevice = \"cpu\"\n\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\n[[datasets]]\nname = {:?}\npath = \"data/{}\"\nlabel = {:?}\nnumeric = {}\ncategorical = {}\nbudget_epsilon = {:?}\nbudget_delta = 1e-5\njob_epsilon_cap = {:?}\ntest_fraction = 0.2\nsplit_seed = 7\nsize_noise_scale = {:?}\n",
            id.join("ca.pem"),
            id.join("cert.pem"),
            id.join("key.pem"),
            d.name,
            d.file_name(),
            d.label,
            toml_list(&d.numeric),
            toml_list(&d.categorical),
            d.budget_epsilon,
            d.job_epsilon_cap,
            d.size_noise_scale,
        )
    }

    /// Where the demo left its state and configs, and how to look again.
    fn print_locations(&self, url: &str) -> Result<()> {
        let layout = &self.layout;
        for dir in &layout.sites {
            out!("  ledger: {}", Layout::ledger(dir).display())?;
        }
        out!("  coordinator state: {}", layout.coordinator.join("state").display())?;
        out!(
            "  reviewer view: meridian budget --coordinator {url} --identity {}",
            layout.federation.join("users").join("rita").display()
        )?;
        out!("  the federation's configs, to run it again by hand or start your own from:")?;
        out!("    {}", layout.coordinator_config().display())?;
        for dir in &layout.sites {
            out!("    {}   (meridian site show|budget|ledger --config it)", dir.join("worker.toml").display())?;
        }
        out!("    {}   (meridian job plan it)", layout.job_file.display())?;
        Ok(())
    }

    /// Writes `summary.json`: the job, its final AUC, the budgets and the paths.
    fn write_summary(&self, status: &pb::JobStatus, budgets: &[pb::BudgetRow]) -> Result<()> {
        let layout = &self.layout;
        let ledgers: BTreeMap<_, _> =
            layout.sites.iter().zip(SITES).map(|(d, s)| (s.to_string(), Layout::ledger(d))).collect();
        let summary = serde_json::json!({
            "job": client::status_json(status),
            "final_auc": final_auc(status).0,
            "budgets": budgets.iter().map(client::budget_json).collect::<Vec<_>>(),
            "model": layout.model,
            "coordinator_db": layout.coordinator.join("state").join("coordinator.sqlite"),
            "ledgers": ledgers,
            "elapsed_secs": self.started.elapsed().as_secs_f64(),
        });
        std::fs::write(layout.work.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
        Ok(())
    }
}

/// Submits the job at `job_file`, retrying while the coordinator refuses it
/// for want of sites (the three are still registering), for up to a minute.
async fn submit_when_registered(scientist: &Connection, job_file: &Path) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client::submit(scientist, job_file).await {
            Ok(id) => return Ok(id),
            Err(e) if Instant::now() < deadline && format!("{e:#}").contains("site") => {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The AUC of the last round that has one, and its standard error.
fn final_auc(status: &pb::JobStatus) -> (Option<f64>, Option<f64>) {
    let final_eval = status.rounds.iter().rev().find(|r| r.eval_metrics.contains_key("auc"));
    let metric = |key: &str| final_eval.and_then(|r| r.eval_metrics.get(key).copied());
    (metric("auc"), metric("auc_se"))
}

/// The results: the final AUC and the ε each hospital spent on the job.
fn print_results(status: &pb::JobStatus, budgets: &[pb::BudgetRow]) -> Result<()> {
    out!("\nResults")?;
    out!(
        "  final test AUC, pooled over the hospitals' noised held-out histograms: {}",
        match final_auc(status) {
            (Some(a), Some(se)) => format!("{a:.4} (standard error {se:.4} from the noise)"),
            (Some(a), None) => format!("{a:.4}"),
            _ => "-".to_string(),
        }
    )?;
    out!("  privacy spent per hospital at δ = {:e} (RDP accountant, recomputed from the ledgers;", status.delta)?;
    out!("  DP-SGD, clip counts and every evaluation released, composed):")?;
    for r in budgets.iter().filter(|r| r.job_id == status.job_id) {
        let total = budgets.iter().find(|t| t.site == r.site && t.dataset == r.dataset && t.job_id.is_empty());
        out!(
            "    {:<12} ε = {:.4} for this job over {} ledger entries (per-job cap {:.1}); dataset total with its size release ε = {:.4}",
            r.site,
            r.epsilon_spent,
            r.rounds,
            r.epsilon_total,
            total.map_or(f64::NAN, |t| t.epsilon_spent)
        )?;
    }
    Ok(())
}
