//! `meridian demo`: a whole federation on this machine. It provisions a CA
//! and certificates, splits a real dataset between three hospitals, starts
//! the coordinator and three workers as separate processes on 127.0.0.1
//! (mutual TLS, each with its own SQLite state), submits a DP-SGD job as a
//! scientist, shows its progress, and ends with the per-round AUC, the ε
//! each hospital spent and where everything is. Child processes die with
//! the demo, also on Ctrl-C.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use tokio::process::{Child, Command};

use crate::client::{self, Connection};
use crate::provision;

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

/// Keeps the child processes and stops them when dropped.
pub(crate) struct Children(pub(crate) Vec<(String, Child)>);

impl Children {
    pub(crate) async fn stop(&mut self) {
        for (_, child) in &mut self.0 {
            if let Some(pid) = child.id() {
                // SIGTERM first: the daemons drain and exit.
                let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
            }
        }
        for (name, child) in &mut self.0 {
            if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                eprintln!("{name} did not stop within 10 s; killing it");
                let _ = child.kill().await;
            }
        }
        self.0.clear();
    }
}

pub(crate) fn spawn(exe: &Path, args: &[&str], log: &Path, name: &str) -> Result<Child> {
    let out = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true)
        .env("MERIDIAN_LOG", "info");
    die_with_parent(&mut cmd);
    cmd.spawn().with_context(|| format!("cannot start the {name}"))
}

/// Writes a `coordinator.toml` listening on a free loopback port, with its
/// state in `state/` beside it, the identity in `identity`, and `settings`
/// (top-level keys) added.
pub(crate) fn write_coordinator_config(path: &Path, identity: &Path, settings: &str) -> Result<()> {
    std::fs::write(
        path,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"state\"\n{settings}\n\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            identity.join("ca.pem"),
            identity.join("cert.pem"),
            identity.join("key.pem")
        ),
    )
    .with_context(|| format!("cannot write {}", path.display()))
}

/// Children get SIGKILL if the demo itself dies (even by `kill -9`).
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
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
    let work = args.work_dir.clone();
    if work.exists() {
        if !work.join(".meridian-demo").exists() && std::fs::read_dir(&work)?.next().is_some() {
            bail!("{} exists and is not an earlier demo; choose another --work-dir", work.display());
        }
        std::fs::remove_dir_all(&work).with_context(|| format!("cannot empty {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    std::fs::write(work.join(".meridian-demo"), "")?;
    let work = work.canonicalize()?;

    let spec = match args.dataset {
        DemoDataset::Brfss => {
            let job = proto::job::JobSpec::from_toml(BRFSS_JOB, "brfss.toml").map_err(anyhow::Error::msg)?;
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
            let job = proto::job::JobSpec::from_toml(WDBC_JOB, "wdbc.toml").map_err(anyhow::Error::msg)?;
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
    };

    crate::out!("Meridian demo: 1 coordinator + 3 hospitals on 127.0.0.1, dataset {}, work dir {}", spec.name, work.display())?;
    let fed = work.join("federation");
    let ids = provision::provision(&provision::Plan {
        out: fed.clone(),
        coordinator_hosts: Vec::new(),
        sites: SITES.iter().map(|s| s.to_string()).collect(),
        users: vec![
            ("alice".to_string(), proto::identity::Role::Scientist),
            ("rita".to_string(), proto::identity::Role::Reviewer),
        ],
        valid_days: 30,
    })?;
    crate::out!("  provisioned a CA and mutual-TLS certificates in {}", fed.display())?;

    let site_dirs: Vec<PathBuf> = SITES.iter().map(|s| work.join(s)).collect();
    let data_dirs: Vec<PathBuf> = site_dirs.iter().map(|d| d.join("data")).collect();
    let file_name = format!("{}.csv.gz", spec.name);
    let counts = match args.dataset {
        DemoDataset::Brfss => partition(BRFSS_GZ, true, &data_dirs, &file_name)?,
        DemoDataset::Wdbc => partition(WDBC_CSV, false, &data_dirs, &file_name)?,
    };
    for (s, n) in SITES.iter().zip(&counts) {
        crate::out!("  {s}: {n} patient records (they never leave {s})")?;
    }

    let coord_dir = work.join("coordinator");
    std::fs::create_dir_all(&coord_dir)?;
    let coord_config = coord_dir.join("coordinator.toml");
    write_coordinator_config(&coord_config, &ids.coordinator, "idle_timeout_secs = 30")?;
    let ready = coord_dir.join("address");
    let mut children = Children(Vec::new());
    let result = async {
        let coord_args = ["coordinator", "--config", path_str(&coord_config)?, "--ready-file", path_str(&ready)?];
        children.0.push(("coordinator".to_string(), spawn(&exe, &coord_args, &coord_dir.join("coordinator.log"), "coordinator")?));
        let addr = wait_for_file(&ready, Duration::from_secs(30), &mut children).await?;
        let url = format!("https://{addr}");
        crate::out!("  coordinator listening on {url} (log: {})", coord_dir.join("coordinator.log").display())?;
        for ((site, dir), (_, id)) in SITES.iter().zip(&site_dirs).zip(&ids.sites) {
            let cfg = dir.join("worker.toml");
            std::fs::write(
                &cfg,
                format!(
                    "coordinator = {url:?}\ndata_dir = \"state\"\ndevice = \"cpu\"\n\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\n[[datasets]]\nname = {:?}\npath = \"data/{file_name}\"\nlabel = {:?}\nnumeric = {}\ncategorical = {}\nbudget_epsilon = {:?}\nbudget_delta = 1e-5\njob_epsilon_cap = {:?}\ntest_fraction = 0.2\nsplit_seed = 7\nsize_noise_scale = {:?}\n",
                    id.join("ca.pem"),
                    id.join("cert.pem"),
                    id.join("key.pem"),
                    spec.name,
                    spec.label,
                    toml_list(&spec.numeric),
                    toml_list(&spec.categorical),
                    spec.budget_epsilon,
                    spec.job_epsilon_cap,
                    spec.size_noise_scale,
                ),
            )?;
            let wargs = ["worker", "--config", path_str(&cfg)?];
            children.0.push((site.to_string(), spawn(&exe, &wargs, &dir.join("worker.log"), site)?));
        }
        crate::out!("  3 hospital workers started (logs: <site>/worker.log)")?;

        let scientist = Connection { coordinator: url.clone(), identity: fed.join("users").join("alice") };
        let job_file = work.join("job.toml");
        std::fs::write(&job_file, spec.job)?;
        // Submission waits for the three sites to register (bounded).
        let deadline = Instant::now() + Duration::from_secs(60);
        let job_id = loop {
            match client::submit(&scientist, &job_file).await {
                Ok(id) => break id,
                Err(e) if Instant::now() < deadline && format!("{e:#}").contains("site") => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => return Err(e),
            }
        };
        crate::out!("\nalice (scientist) submitted job {job_id} from {}", job_file.display())?;
        let how = if args.quiet {
            client::WatchOutput::Quiet
        } else if crate::output::progress_bar() {
            client::WatchOutput::Terminal
        } else {
            client::WatchOutput::Lines
        };
        let status = client::watch(&scientist, &job_id, how).await?;
        crate::out!("")?;
        crate::output::block(&client::render_status(&status))?;
        if status.state != "completed" {
            bail!("job {job_id} ended {}: {}", status.state, status.reason);
        }
        let model = work.join("model.safetensors");
        let (round, n) = client::pull_model(&scientist, &job_id, None, &model).await?;
        let reviewer = Connection { coordinator: url.clone(), identity: fed.join("users").join("rita") };
        let budgets = client::budgets(&reviewer).await?;
        let final_eval = status.rounds.iter().rev().find(|r| r.eval_metrics.contains_key("auc"));
        let final_auc = final_eval.and_then(|r| r.eval_metrics.get("auc").copied());
        let final_se = final_eval.and_then(|r| r.eval_metrics.get("auc_se").copied());
        crate::out!("\nResults")?;
        crate::out!(
            "  final test AUC, pooled over the hospitals' noised held-out histograms: {}",
            match (final_auc, final_se) {
                (Some(a), Some(se)) => format!("{a:.4} (standard error {se:.4} from the noise)"),
                (Some(a), None) => format!("{a:.4}"),
                _ => "-".to_string(),
            }
        )?;
        crate::out!(
            "  privacy spent per hospital at δ = {:e} (RDP accountant, recomputed from the ledgers;",
            status.delta
        )?;
        crate::out!("  DP-SGD, clip counts and every evaluation released, composed):")?;
        for r in budgets.iter().filter(|r| r.job_id == job_id) {
            let total = budgets.iter().find(|t| t.site == r.site && t.dataset == r.dataset && t.job_id.is_empty());
            crate::out!(
                "    {:<12} ε = {:.4} for this job over {} ledger entries (per-job cap {:.1}); dataset total with its size release ε = {:.4}",
                r.site,
                r.epsilon_spent,
                r.rounds,
                r.epsilon_total,
                total.map_or(f64::NAN, |t| t.epsilon_spent)
            )?;
        }
        crate::out!("  model (round {round}, {n} parameters): {}", model.display())?;
        for dir in &site_dirs {
            crate::out!("  ledger: {}", dir.join("state").join("ledger.sqlite").display())?;
        }
        crate::out!("  coordinator state: {}", coord_dir.join("state").display())?;
        crate::out!("  reviewer view: meridian budget --coordinator {url} --identity {}", fed.join("users").join("rita").display())?;
        crate::out!("  the federation's configs, to run it again by hand or start your own from:")?;
        crate::out!("    {}", coord_config.display())?;
        for dir in &site_dirs {
            crate::out!("    {}   (meridian site show|budget|ledger --config it)", dir.join("worker.toml").display())?;
        }
        crate::out!("    {}   (meridian job plan it)", job_file.display())?;
        let summary = serde_json::json!({
            "job": client::status_json(&status),
            "final_auc": final_auc,
            "budgets": budgets.iter().map(client::budget_json).collect::<Vec<_>>(),
            "model": model,
            "coordinator_db": coord_dir.join("state").join("coordinator.sqlite"),
            "ledgers": site_dirs.iter().zip(SITES).map(|(d, s)| (s.to_string(), d.join("state").join("ledger.sqlite"))).collect::<std::collections::BTreeMap<_, _>>(),
            "elapsed_secs": started.elapsed().as_secs_f64(),
        });
        std::fs::write(work.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
        Ok(())
    };
    let outcome = tokio::select! {
        r = result => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    children.stop().await;
    match &outcome {
        Ok(()) => crate::out!("\nall processes stopped; demo finished in {:.0} s", started.elapsed().as_secs_f64())?,
        Err(_) => eprintln!("all processes stopped; logs are in {}", work.display()),
    }
    outcome
}

pub(crate) fn path_str(p: &Path) -> Result<&str> {
    p.to_str().with_context(|| format!("path {} is not UTF-8", p.display()))
}

pub(crate) async fn wait_for_file(path: &Path, limit: Duration, children: &mut Children) -> Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && !s.trim().is_empty()
        {
            return Ok(s.trim().to_string());
        }
        for (name, child) in &mut children.0 {
            if let Some(status) = child.try_wait()? {
                bail!("the {name} exited early ({status}); see its log");
            }
        }
        if Instant::now() > deadline {
            bail!("{} did not appear within {:?}", path.display(), limit);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
