//! `meridian`: the one binary. It parses the command line, installs logging,
//! and dispatches to the daemons (`coordinator`, `worker`) or to the client
//! commands; the work itself lives in the library crates. Each subcommand has
//! its own module, holding its flags and its handler; this file is the
//! command line's top level and the wiring that turns a result into an exit
//! code.

mod application;
mod audit;
mod budget;
mod client;
mod daemon;
mod demo;
mod init;
mod job;
mod local_federation;
mod model;
mod output;
mod privacy;
mod provision;
mod safetensors;
mod sim;
mod site;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use client::Connection;

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
        Connection { coordinator: self.coordinator.clone(), identity: self.identity.clone() }
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
        log_format: daemon::LogFormat,
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
        log_format: daemon::LogFormat,
    },
    /// Create a federation's CA and certificates, or add and renew identities with its CA.
    #[command(args_conflicts_with_subcommands = true)]
    Provision {
        #[command(subcommand)]
        command: Option<provision::ProvisionCommand>,
        #[command(flatten)]
        args: provision::ProvisionArgs,
    },
    /// Data-use applications: submit one, list them, show one's terms.
    Application {
        #[command(subcommand)]
        command: application::ApplicationCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Submit, list, inspect, watch and cancel training jobs.
    Job {
        #[command(subcommand)]
        command: job::JobCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Download trained models.
    Model {
        #[command(subcommand)]
        command: model::ModelCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Privacy budgets (ε spent and remaining) per hospital, dataset and job, and the ledgers behind them.
    Budget {
        #[command(subcommand)]
        command: Option<budget::BudgetCommand>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Privacy calculators: ε of a DP-SGD run, or the noise a target ε needs.
    Privacy {
        #[command(subcommand)]
        command: privacy::PrivacyCommand,
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
        command: audit::AuditCommand,
    },
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

/// Runs one command: hands it to its module.
async fn run(cli: Cli) -> Result<Exit> {
    let done = |()| Exit::Ok;
    match cli.command {
        Command::Demo(args) => demo::run(args).await.map(done),
        Command::Sim(args) => sim::run(args).await.map(done),
        Command::Coordinator { config, ready_file, log_format } => {
            daemon::coordinator(&config, ready_file.as_deref(), log_format).await.map(done)
        }
        Command::Worker { config, check: true, connect, .. } => daemon::check_worker(&config, connect).await,
        Command::Worker { config, check: false, log_format, .. } => daemon::worker(&config, log_format).await.map(done),
        Command::Provision { command, args } => provision::run(command, args).map(done),
        Command::Application { command, client } => application::run(command, &client.connection()).await.map(done),
        Command::Job { command, client } => job::run(command, &client.connection()).await,
        Command::Model { command, client } => model::run(command, &client.connection()).await.map(done),
        Command::Budget { command, json, client } => budget::run(command, json, &client.connection()).await.map(done),
        Command::Privacy { command } => privacy::run(command).map(done),
        Command::Site { command, config } => site::run(command, &config).map(done),
        Command::Init { template, out, force } => init::run(template, out, force).map(done),
        Command::Audit { command } => audit::run(command).map(done),
    }
}

fn main() {
    meridian_sys::memory::keep_transfer_buffers();
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
