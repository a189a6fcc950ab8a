//! Meridian's coordinator: it never sees a patient record. It holds jobs,
//! runs their rounds, averages the sites' differentially private updates,
//! checkpoints the global model, and mirrors every site's privacy ledger so
//! reviewers can read budgets in one place.
//!
//! # Brief overview
//! - [`run`]: serves the gRPC API on a listener with mutual TLS until the
//!   shutdown token fires, resuming unfinished jobs first.
//! - [`CoordinatorConfig`]: the validated `coordinator.toml`.
//! - `engine`: the per-job state machine (offers → rounds → evaluation).
//! - `service`: the RPCs, authorized by the role in the caller's certificate;
//!   `applications` the data-use applications' (submit, list, show).
//! - `upload`: receiving an update, from the slot it waits for to the row
//!   that counts it: leases, transfers in flight, the file it is written
//!   to, updates sent in parts, and [`admission`], the checks every update
//!   passes before it is counted.
//! - `metrics`: a round's metrics, derived from the sites' noised releases.
//! - `plan`: a job checked and costed at every site before it is submitted.
//! - `model_cache`: each live job's latest model as wire chunks, shared by
//!   its pullers.
//! - `store`: SQLite state; models and updates are files written by
//!   `meridian_store::checkpoint`.

pub mod aggregate;
mod applications;
mod budget;
mod config;
mod engine;
mod metrics;
mod model_cache;
mod plan;
mod revocation;
mod service;
mod store;
mod upload;

pub use upload::admission;

/// A stream of messages or errors, as the services return it.
pub(crate) type BoxStream<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;

use std::sync::Arc;

pub use config::{ConfigError, CoordinatorConfig};
use meridian_wire::identity::IdentityFiles;
use meridian_wire::pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::TcpIncoming;
use tracing::info;

/// Why the coordinator could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The state directory or database could not be opened.
    #[error("state in {path}: {detail}")]
    State {
        /// The data directory.
        path: std::path::PathBuf,
        /// What failed.
        detail: String,
    },
    /// The TLS files could not be read.
    #[error(transparent)]
    Identity(#[from] meridian_wire::identity::IdentityError),
    /// The gRPC server failed.
    #[error("server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Largest gRPC message accepted: chunks are 1 MiB, so anything much larger is hostile.
const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Serves the coordinator on `listener` until `shutdown` is cancelled, then
/// drains in-flight work.
pub async fn run(
    listener: TcpListener,
    config: CoordinatorConfig,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let state_err = |detail: String| RunError::State { path: config.data_dir.clone(), detail };
    std::fs::create_dir_all(&config.data_dir).map_err(|e| state_err(e.to_string()))?;
    let store =
        store::Store::open(&config.data_dir.join("coordinator.sqlite")).map_err(|e| state_err(e.to_string()))?;
    let identity = IdentityFiles::from_paths(&config.tls_ca, &config.tls_cert, &config.tls_key)?;
    let audit = meridian_store::audit::AuditLog::open(&config.data_dir.join("audit.log"))
        .map_err(|e| state_err(e.to_string()))?;
    let (changes, _) = tokio::sync::watch::channel(0u64);
    let coordinator = Arc::new(engine::Coordinator {
        store,
        data_dir: config.data_dir.clone(),
        idle_timeout_secs: config.idle_timeout_secs,
        changes,
        shutdown: shutdown.clone(),
        tasks: TaskTracker::new(),
        audit,
        // An incomplete upload's parts wait as long as a silent stream would.
        uploads: upload::Uploads::new(std::time::Duration::from_secs(config.idle_timeout_secs.max(1))),
        models: model_cache::ModelCache::default(),
    });
    coordinator.resume_jobs().map_err(|e| state_err(e.to_string()))?;
    let services = service::Services {
        inner: Arc::clone(&coordinator),
        ca_pem: identity.ca_pem.clone(),
        revocations: Arc::new(revocation::Revocations::new(&config)),
        board: Arc::default(),
    };
    info!(addr = ?listener.local_addr().ok(), "coordinator listening");
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(config.receive_window_bytes))
        // Four streams' worth per connection: an upload queued unread must not
        // stall the same site's heartbeats and answers on that connection.
        .initial_connection_window_size(Some(config.receive_window_bytes.saturating_mul(4)))
        .max_frame_size(Some(meridian_wire::tensor::MAX_FRAME_BYTES))
        .tls_config(identity.server_tls())?
        .add_service(
            pb::worker_service_server::WorkerServiceServer::new(services.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            pb::job_service_server::JobServiceServer::new(services.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(pb::application_service_server::ApplicationServiceServer::new(services.clone()))
        .add_service(pb::privacy_service_server::PrivacyServiceServer::new(services))
        .serve_with_incoming_shutdown(incoming(listener), shutdown.cancelled_owned())
        .await?;
    coordinator.tasks.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), coordinator.tasks.wait()).await;
    info!("coordinator stopped");
    Ok(())
}

/// Accepted connections with Nagle's algorithm off (a connection on which
/// it cannot be turned off is served anyway, with a warning). With it on,
/// the small frames the coordinator answers an upload with (HTTP/2 window
/// updates) wait for the site's delayed ACK, once per chunk.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}
