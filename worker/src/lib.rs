//! Meridian's hospital worker: the only process that reads patient rows.
//! It connects out to the coordinator over mutual TLS, decides each job
//! offer against the site's own policy and privacy budget, trains locally
//! with DP-SGD on Burn, commits every round's ε to its ledger before the
//! update leaves, and evaluates global models on a local held-out split.
//!
//! # Brief overview
//! - [`run`]: the daemon; reconnects with jittered backoff until shutdown.
//! - [`WorkerConfig`]: the validated `worker.toml` (datasets, budgets, policy).
//! - [`dataset`]: CSV loading and encoding; [`ledger`]: the site's privacy
//!   ledger and budget; [`train`]: DP-SGD rounds and evaluation.
//! - [`error`]: why the daemon could not start, or a transfer failed.
//! - [`decisions`]: the site's own check of a steward's signed decision on
//!   a data-use application, against its policy's honoured stewards.

pub mod approvals;
pub mod check;
pub mod config;
mod daemon;
pub mod dataset;
pub mod decisions;
pub mod download;
pub mod error;
pub mod ledger;
pub mod outgoing;
pub mod policy;
pub mod release;
pub mod train;
pub mod upload;

pub use config::{ConfigError, DatasetConfig, TrainingDevice, WorkerConfig};
pub use error::RunError;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Runs the worker until `shutdown` is cancelled: opens the site's state,
/// then serves sessions with the coordinator, reconnecting whenever one is
/// lost, and at shutdown waits a while for the tasks under way.
pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    let worker = daemon::Worker::open(config, shutdown)?;
    info!(site = %worker.site(), coordinator = %worker.coordinator(), "worker starting");
    worker.serve().await;
    worker.stop().await;
    info!("worker stopped");
    Ok(())
}
