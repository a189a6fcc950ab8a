//! `meridian coordinator` and `meridian worker`: the two daemons, run from
//! their libraries. The binary's part is what the libraries must not know
//! about: the log subscriber, the signals that stop a daemon, the ready file
//! a script waits on, and `worker --check`'s exit code.

use std::path::Path;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use crate::{Exit, output};

/// How a daemon writes its log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
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

/// `meridian coordinator`: binds the configured address, writes it to
/// `ready_file` once listening, and serves until a signal.
pub async fn coordinator(config: &Path, ready_file: Option<&Path>, log_format: LogFormat) -> Result<()> {
    init_logging(log_format);
    let config = meridian_coordinator::CoordinatorConfig::load(config)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    if let Some(path) = ready_file {
        meridian_store::atomic::replace(path, addr.to_string().as_bytes(), Default::default())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    meridian_coordinator::run(listener, config, shutdown_on_signals()).await?;
    Ok(())
}

/// `meridian worker`: runs the worker until a signal.
pub async fn worker(config: &Path, log_format: LogFormat) -> Result<()> {
    let config = meridian_worker::WorkerConfig::load(config)?;
    init_logging(log_format);
    meridian_worker::run(config, shutdown_on_signals()).await?;
    Ok(())
}

/// `meridian worker --check [--connect]`: lists every problem of the
/// worker's setup; the exit code says whether there was one.
pub async fn check_worker(config: &Path, connect: bool) -> Result<Exit> {
    let config = meridian_worker::WorkerConfig::load(config)?;
    let mut report = meridian_worker::check::check(&config);
    if connect {
        meridian_worker::check::connect(&config, &mut report).await;
    }
    output::block(&report.render())?;
    Ok(if report.problems.is_empty() { Exit::Ok } else { Exit::Error })
}
