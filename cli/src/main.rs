//! `meridian`: the one binary. It parses the command line, installs logging,
//! and dispatches to the daemons (`coordinator`, `worker`) or to the client
//! commands; the work itself lives in the library crates.

mod client;
mod demo;
mod init;
mod output;
mod provision;
mod safetensors;
mod sim;
mod site;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use client::Connection;
use proto::identity::Role;
use tokio_util::sync::CancellationToken;

/// Privacy-preserving federated learning for hospitals: a coordinator runs
/// training rounds, each hospital's worker trains locally with DP-SGD and
/// keeps its own privacy ledger, every connection is mutually
/// authenticated TLS.
#[derive(Parser)]
#[command(name = "meridian", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How a client reaches the coordinator.
#[derive(Args, Clone)]
struct ClientArgs {
    /// Coordinator URL.
    #[arg(long, env = "MERIDIAN_COORDINATOR", default_value = "https://127.0.0.1:7443", global = true)]
    coordinator: String,
    /// Directory holding your ca.pem, cert.pem and key.pem (from `meridian provision`).
    #[arg(long, env = "MERIDIAN_IDENTITY", default_value = ".", global = true)]
    identity: PathBuf,
}

impl ClientArgs {
    fn connection(&self) -> Connection {
        Connection {
            coordinator: self.coordinator.clone(),
            identity: self.identity.clone(),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a coordinator and three hospital workers on this machine with a real dataset and DP training.
    Demo(demo::DemoArgs),
    /// Run a job through a real coordinator with many simulated hospitals (no training) and report round times and memory.
    Sim(sim::SimArgs),
    /// Run the coordinator daemon.
    Coordinator {
        /// Path of coordinator.toml.
        #[arg(long)]
        config: PathBuf,
        /// Write the bound address to this file once listening (for scripts binding port 0).
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// How log lines are written to stderr.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Run a hospital worker daemon, or check its configuration.
    Worker {
        /// Path of worker.toml.
        #[arg(long)]
        config: PathBuf,
        /// Only check, then exit: the configuration, every row of every
        /// dataset, the TLS identity, the budgets and the state directory;
        /// every problem is listed, and the exit code is 1 if there is one.
        #[arg(long)]
        check: bool,
        /// With --check: also connect to the coordinator with mutual TLS.
        #[arg(long, requires = "check")]
        connect: bool,
        /// How log lines are written to stderr.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Create a federation's CA and certificates, or add and renew identities with its CA.
    #[command(args_conflicts_with_subcommands = true)]
    Provision {
        #[command(subcommand)]
        command: Option<ProvisionCommand>,
        #[command(flatten)]
        args: ProvisionArgs,
    },
    /// Submit, list, inspect, watch and cancel training jobs.
    Job {
        #[command(subcommand)]
        command: JobCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Download trained models.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Privacy budgets (ε spent and remaining) per hospital, dataset and job, and the ledgers behind them.
    Budget {
        #[command(subcommand)]
        command: Option<BudgetCommand>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Privacy calculators: ε of a DP-SGD run, or the noise a target ε needs.
    Privacy {
        #[command(subcommand)]
        command: PrivacyCommand,
    },
    /// Hospital IT on the worker host: job offers waiting for approval (policy approval = "manual").
    Site {
        #[command(subcommand)]
        command: site::SiteCommand,
        /// The worker's worker.toml.
        #[arg(long, global = true, default_value = "worker.toml")]
        config: PathBuf,
    },
    /// Write a commented, working coordinator.toml, worker.toml or job.toml to start from.
    Init {
        /// What to write.
        #[arg(value_enum)]
        template: init::Template,
        /// Where (default: coordinator.toml, worker.toml or job.toml here; - for stdout).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Check a coordinator's or worker's tamper-evident audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify the hash chain of an audit log (its data_dir/audit.log); names the first entry that fails.
    Verify {
        /// The audit.log file.
        path: PathBuf,
    },
    /// Print the entries of an audit log, verified first.
    Show {
        /// The audit.log file.
        path: PathBuf,
    },
}

#[derive(Args)]
struct ProvisionArgs {
    /// Directory to create the federation in.
    #[arg(long, default_value = "federation")]
    out: PathBuf,
    /// A hospital site name (repeat for each site).
    #[arg(long = "site")]
    sites: Vec<String>,
    /// A user as NAME:ROLE with ROLE scientist, reviewer or admin (repeat).
    #[arg(long = "user")]
    users: Vec<String>,
    /// Extra DNS name or IP address of the coordinator (repeat).
    #[arg(long = "coordinator-host")]
    coordinator_hosts: Vec<String>,
    /// Validity of each certificate in days.
    #[arg(long, default_value_t = 365)]
    valid_days: u32,
}

#[derive(Subcommand)]
enum ProvisionCommand {
    /// Sign a certificate for one more hospital with the existing CA; no other certificate changes.
    AddSite {
        /// Site name.
        name: String,
        /// The federation directory (holding ca/ca.pem and ca/ca.key).
        #[arg(long, default_value = "federation")]
        federation: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        valid_days: u32,
    },
    /// Sign a certificate for one more user with a role, with the existing CA.
    AddUser {
        /// User name.
        name: String,
        /// scientist, reviewer or admin.
        #[arg(long)]
        role: String,
        /// The federation directory.
        #[arg(long, default_value = "federation")]
        federation: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        valid_days: u32,
    },
    /// Replace an identity's key and certificate (before it expires); the coordinator needs no restart.
    Renew {
        /// Site or user name (or "coordinator").
        name: String,
        /// The federation directory.
        #[arg(long, default_value = "federation")]
        federation: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        valid_days: u32,
    },
}

#[derive(Subcommand)]
enum JobCommand {
    /// Submit a job spec (TOML); prints the job id.
    Submit {
        /// The job spec file.
        spec: PathBuf,
        /// Watch the job until it ends (exit code 3 if it fails or is cancelled).
        #[arg(long)]
        watch: bool,
        /// With --watch: one JSON object per event (JSON Lines), ending with the final state.
        #[arg(long, requires = "watch")]
        json: bool,
    },
    /// Check a job spec and say what each site would charge, submitting nothing.
    ///
    /// The spec is checked offline first, then against every site that
    /// holds its dataset: its announced schema and policy, its released
    /// sizes, its per-job cap and budget. Exit code 1 if fewer sites would
    /// take the job than it needs.
    Plan {
        /// The job spec file.
        spec: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List every job.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one job: state, sites, per-round metrics.
    Status {
        /// Job id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow a job live until it ends (exit code 3 if it fails or is cancelled).
    ///
    /// On a terminal: a progress bar and a line per round. Piped: one plain
    /// line per round. With --json: one JSON object per event (JSON Lines),
    /// ending with the final state.
    Watch {
        /// Job id.
        id: String,
        /// One JSON object per event (JSON Lines).
        #[arg(long)]
        json: bool,
    },
    /// Cancel a running job.
    Cancel {
        /// Job id.
        id: String,
        /// Why, shown to everyone.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Download a job's global model as .safetensors (PyTorch nn.Sequential names).
    Pull {
        /// Job id.
        id: String,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
        /// Round whose model to pull (default: the latest).
        #[arg(long)]
        round: Option<u32>,
    },
}

#[derive(Subcommand)]
enum BudgetCommand {
    /// Every ledger entry, with all parameters needed to recompute ε.
    Ledger {
        /// Only this site.
        #[arg(long, default_value = "")]
        site: String,
        /// Only this dataset.
        #[arg(long, default_value = "")]
        dataset: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Which accountant computes ε.
#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
enum AccountantKind {
    /// Rényi DP (Mironov et al.), dp_accounting's default orders and improved conversion.
    Rdp,
    /// Privacy loss distribution (dp_accounting's PLD, discretization 1e-4): tighter.
    Pld,
}

#[derive(Subcommand)]
enum PrivacyCommand {
    /// ε of DP-SGD (Poisson-subsampled Gaussian) by the RDP accountant.
    Epsilon {
        /// Poisson sampling rate q.
        #[arg(long)]
        sample_rate: f64,
        /// Noise multiplier σ.
        #[arg(long)]
        noise: f64,
        /// Number of steps.
        #[arg(long)]
        steps: u64,
        /// δ.
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
        /// rdp (Rényi DP, dp_accounting's orders and conversion) or pld (privacy loss distribution, tighter).
        #[arg(long, value_enum, default_value = "rdp")]
        accountant: AccountantKind,
        /// Use the old conversion ε = rdp + ln(1/δ)/(α−1) on TF Privacy's orders (reproduces published tables; rdp only).
        #[arg(long)]
        legacy_conversion: bool,
        /// Print JSON with full precision.
        #[arg(long)]
        json: bool,
    },
    /// The smallest noise multiplier σ that meets a target ε.
    Noise {
        /// Target ε.
        #[arg(long)]
        target_epsilon: f64,
        /// Poisson sampling rate q.
        #[arg(long)]
        sample_rate: f64,
        /// Number of steps.
        #[arg(long)]
        steps: u64,
        /// δ.
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
        /// Print JSON with full precision.
        #[arg(long)]
        json: bool,
    },
}

/// How a daemon writes its log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// One line per event; coloured on a terminal unless NO_COLOR is set.
    Text,
    /// One JSON object per event, for log collectors.
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MERIDIAN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(output::stderr_colour()).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

/// A token cancelled on SIGINT or SIGTERM.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
        t.cancel();
    });
    token
}

/// How a command ended, as its exit code (the README's "Exit codes").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exit {
    /// It did what was asked.
    Ok = 0,
    /// It could not: bad input, an unreachable coordinator, a refusal.
    Error = 1,
    /// The command line itself is wrong (clap's own exit code).
    #[allow(dead_code)]
    Usage = 2,
    /// The job it watched ended failed or cancelled.
    JobEnded = 3,
}

/// `job watch` and `job submit --watch`: reports the job as the output
/// allows, then its final state; the exit code says how it ended.
async fn watch_job(conn: &Connection, id: &str, json: bool) -> Result<Exit> {
    let how = if json {
        client::WatchOutput::Json
    } else if output::progress_bar() {
        client::WatchOutput::Terminal
    } else {
        client::WatchOutput::Lines
    };
    let status = client::watch(conn, id, how).await?;
    if !json {
        output::block(&client::render_status(&status))?;
    }
    Ok(if status.state == "completed" { Exit::Ok } else { Exit::JobEnded })
}

async fn run(cli: Cli) -> Result<Exit> {
    match cli.command {
        Command::Demo(args) => demo::run(args).await.map(|()| Exit::Ok),
        Command::Sim(args) => sim::run(args).await.map(|()| Exit::Ok),
        Command::Coordinator { config, ready_file, log_format } => {
            init_logging(log_format);
            let config = coordinator::CoordinatorConfig::load(&config)?;
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?;
            let addr = listener.local_addr()?;
            if let Some(path) = ready_file {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, addr.to_string()).and_then(|()| std::fs::rename(&tmp, &path))
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            coordinator::run(listener, config, shutdown_on_signals()).await?;
            Ok(Exit::Ok)
        }
        Command::Worker { config, check, connect, log_format } => {
            let config = worker::WorkerConfig::load(&config)?;
            if check {
                let mut report = worker::check::check(&config);
                if connect {
                    worker::check::connect(&config, &mut report).await;
                }
                output::block(&report.render())?;
                return Ok(if report.problems.is_empty() { Exit::Ok } else { Exit::Error });
            }
            init_logging(log_format);
            worker::run(config, shutdown_on_signals()).await?;
            Ok(Exit::Ok)
        }
        Command::Provision { command: Some(command), .. } => {
            let (name, role, federation, days, renew) = match command {
                ProvisionCommand::AddSite { name, federation, valid_days } => (name, Role::Hospital, federation, valid_days, false),
                ProvisionCommand::AddUser { name, role, federation, valid_days } => {
                    let role: Role = role.parse().map_err(anyhow::Error::msg)?;
                    if matches!(role, Role::Hospital | Role::Coordinator) {
                        bail!("--role {role}: users are scientist, reviewer or admin; hospitals use add-site");
                    }
                    (name, role, federation, valid_days, false)
                }
                ProvisionCommand::Renew { name, federation, valid_days } => {
                    let role = if name == "coordinator" {
                        Role::Coordinator
                    } else if federation.join("sites").join(&name).exists() {
                        Role::Hospital
                    } else {
                        let cert = std::fs::read(federation.join("users").join(&name).join("cert.pem"))
                            .with_context(|| format!("{name} is neither a site nor a user of {}", federation.display()))?;
                        proto::identity::principal_from_pem(&cert).map_err(anyhow::Error::msg)?.role
                    };
                    (name, role, federation, valid_days, true)
                }
            };
            let (dir, fingerprint) = provision::add(&federation, &name, role, days, renew)?;
            out!("{} {name} ({role}) in {}", if renew { "renewed" } else { "added" }, dir.display())?;
            out!("certificate sha256 {fingerprint}")?;
            Ok(Exit::Ok)
        }
        Command::Provision { command: None, args } => {
            let mut users = Vec::new();
            for u in &args.users {
                let (name, role) = u.split_once(':').with_context(|| format!("--user \"{u}\": expected NAME:ROLE"))?;
                let role: Role = role.parse().map_err(anyhow::Error::msg)?;
                if matches!(role, Role::Hospital | Role::Coordinator) {
                    bail!("--user \"{u}\": users are scientist, reviewer or admin; hospitals use --site");
                }
                users.push((name.to_string(), role));
            }
            let done = provision::provision(&provision::Plan {
                out: args.out.clone(),
                coordinator_hosts: args.coordinator_hosts,
                sites: args.sites,
                users,
                valid_days: args.valid_days,
            })?;
            out!("federation in {}", args.out.display())?;
            out!("  coordinator  {}", done.coordinator.display())?;
            for (n, p) in done.sites.iter().chain(&done.users) {
                out!("  {n:<12} {}", p.display())?;
            }
            Ok(Exit::Ok)
        }
        Command::Job { command, client } => {
            let conn = client.connection();
            match command {
                JobCommand::Submit { spec, watch, json } => {
                    let id = client::submit(&conn, &spec).await?;
                    if !json {
                        out!("{id}")?;
                    }
                    if watch {
                        return watch_job(&conn, &id, json).await;
                    }
                }
                JobCommand::Plan { spec, json } => {
                    let plan = client::plan(&conn, &spec).await?;
                    if json {
                        output::json(&client::plan_json(&plan))?;
                    } else {
                        output::block(&client::render_plan(&plan))?;
                    }
                    if plan.takers < plan.min_sites {
                        return Ok(Exit::Error);
                    }
                }
                JobCommand::List { json } => {
                    let jobs = conn.jobs().await?.list_jobs(proto::pb::ListJobsRequest {}).await.map_err(client::status_error)?.into_inner().jobs;
                    if json {
                        output::json(&serde_json::json!(&jobs.iter().map(client::status_json).collect::<Vec<_>>()))?;
                    } else {
                        out!("job           state       round   model                dataset     name")?;
                        for j in jobs {
                            out!("{:<13} {:<11} {:>3}/{:<3} {:<20} {:<11} {}", j.job_id, j.state, j.current_round, j.total_rounds, j.model, j.dataset, j.name)?;
                        }
                    }
                }
                JobCommand::Status { id, json } => {
                    let s = client::get(&conn, &id).await?;
                    if json {
                        output::json(&serde_json::json!(&client::status_json(&s)))?;
                    } else {
                        output::block(&client::render_status(&s))?;
                    }
                }
                JobCommand::Watch { id, json } => return watch_job(&conn, &id, json).await,
                JobCommand::Cancel { id, reason } => {
                    let s = conn.jobs().await?.cancel_job(proto::pb::CancelJobRequest { job_id: id, reason }).await.map_err(client::status_error)?.into_inner();
                    out!("{} {}: {}", s.job_id, s.state, s.reason)?;
                }
            }
            Ok(Exit::Ok)
        }
        Command::Model { command: ModelCommand::Pull { id, output, round }, client } => {
            let (round, n) = client::pull_model(&client.connection(), &id, round, &output).await?;
            out!("wrote {} (round {round}, {n} parameters)", output.display())?;
            Ok(Exit::Ok)
        }
        Command::Budget { command, json, client } => {
            let conn = client.connection();
            match command {
                None => {
                    let rows = client::budgets(&conn).await?;
                    if json {
                        output::json(&serde_json::json!(&rows.iter().map(client::budget_json).collect::<Vec<_>>()))?;
                    } else {
                        output::block(&client::render_budgets(&rows))?;
                    }
                }
                Some(BudgetCommand::Ledger { site, dataset, json: json_here }) => {
                    let entries = client::ledger(&conn, &site, &dataset).await?;
                    if json || json_here {
                        output::json(&serde_json::json!(&entries.iter().map(client::ledger_json).collect::<Vec<_>>()))?;
                    } else {
                        output::block(&client::render_ledger(&entries))?;
                    }
                }
            }
            Ok(Exit::Ok)
        }
        Command::Site { command, config } => site::run(command, &config).map(|()| Exit::Ok),
        Command::Init { template, out, force } => init::run(template, out, force).map(|()| Exit::Ok),
        Command::Audit { command: AuditCommand::Verify { path } } => {
            let (entries, head) = proto::audit::verify(&path)?;
            out!("{}: {entries} entries, hash chain intact (head {head})", path.display())?;
            Ok(Exit::Ok)
        }
        Command::Audit { command: AuditCommand::Show { path } } => {
            proto::audit::verify(&path)?;
            let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            for line in text.lines() {
                let e: proto::audit::AuditEntry = serde_json::from_str(line)?;
                out!("{:>5}  {}  {:<18} {:<14} {}", e.seq, e.at_unix_ms, e.kind, e.subject, e.detail)?;
            }
            Ok(Exit::Ok)
        }
        Command::Privacy { command } => {
            match command {
                PrivacyCommand::Epsilon { sample_rate, noise, steps, delta, accountant: AccountantKind::Pld, legacy_conversion, json } => {
                    if legacy_conversion {
                        bail!("--legacy-conversion applies to the rdp accountant only");
                    }
                    let epsilon = privacy::accountant::dpsgd_epsilon_pld(sample_rate, noise, steps, delta)?;
                    if json {
                        out!("{}", serde_json::json!({
                            "epsilon": epsilon, "delta": delta, "accountant": "pld", "discretization": 1e-4,
                            "sample_rate": sample_rate, "noise_multiplier": noise, "steps": steps,
                        }))?;
                    } else {
                        out!("ε = {epsilon:.6} at δ = {delta:e} (PLD, discretization 1e-4)")?;
                    }
                }
                PrivacyCommand::Epsilon { sample_rate, noise, steps, delta, accountant: AccountantKind::Rdp, legacy_conversion, json } => {
                    let mut acc = if legacy_conversion { privacy::accountant::RdpAccountant::legacy() } else { privacy::accountant::RdpAccountant::new() };
                    acc.compose_poisson_gaussian(sample_rate, noise, steps)?;
                    let e = if legacy_conversion { acc.epsilon_legacy(delta)? } else { acc.epsilon(delta)? };
                    let conversion = if legacy_conversion { "legacy" } else { "improved" };
                    if json {
                        out!("{}", serde_json::json!({
                            "epsilon": e.epsilon, "delta": delta, "order": e.order, "accountant": "rdp", "conversion": conversion,
                            "sample_rate": sample_rate, "noise_multiplier": noise, "steps": steps,
                        }))?;
                    } else {
                        out!("ε = {:.6} at δ = {delta:e} (RDP, optimal order {}, {conversion} conversion)", e.epsilon, e.order)?;
                    }
                }
                PrivacyCommand::Noise { target_epsilon, sample_rate, steps, delta, json } => {
                    let sigma = privacy::accountant::noise_multiplier_for_epsilon(target_epsilon, sample_rate, steps, delta)?;
                    if json {
                        out!("{}", serde_json::json!({
                            "noise_multiplier": sigma, "target_epsilon": target_epsilon, "delta": delta, "sample_rate": sample_rate, "steps": steps,
                        }))?;
                    } else {
                        out!("σ = {sigma:.6} gives ε ≤ {target_epsilon} at δ = {delta:e} over {steps} steps at q = {sample_rate}")?;
                    }
                }
            }
            Ok(Exit::Ok)
        }
    }
}

fn main() {
    proto::memory::keep_transfer_buffers();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(Exit::Error as i32);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(exit) => std::process::exit(exit as i32),
        // Output piped into `head` and cut short: done, quietly.
        Err(e) if output::is_broken_pipe(&e) => std::process::exit(Exit::Ok as i32),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(Exit::Error as i32);
        }
    }
}
