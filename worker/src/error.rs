//! The worker's error types, so that a failure keeps its kind until the one
//! place that reports it: [`RunError`], why the daemon could not start;
//! [`TransferError`], why a model or an update did not cross the wire; and
//! `WorkerError` (the crate's own), why a session or a task ended. A gRPC
//! status is one variant among them, never the type every internal function
//! returns.
//!
//! Nothing here is sent to the coordinator: what leaves a site about a
//! failure is a reason code, built by [`crate::outgoing`].

use std::path::PathBuf;

use meridian_wire::tensor::ChunkError;
use tonic::Code;

use crate::approvals::ApprovalError;
use crate::dataset::DatasetError;
use crate::ledger::LedgerError;
use crate::train::TrainError;

/// Why the worker could not start.
///
/// A variant's cause is in its message and is not also its `source`, so
/// that a chain printed whole (`{:#}`) says it once.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// TLS files unreadable.
    #[error(transparent)]
    Identity(#[from] meridian_wire::identity::IdentityError),
    /// The site certificate does not name a hospital.
    #[error("{path}: {detail}")]
    Certificate {
        /// The certificate file.
        path: PathBuf,
        /// What is wrong.
        detail: CertificateProblem,
    },
    /// The state directory or a store in it could not be opened.
    #[error("state in {path}: {detail}")]
    State {
        /// The data directory.
        path: PathBuf,
        /// What failed.
        detail: StateError,
    },
    /// The coordinator URL or the TLS settings for it are unusable.
    #[error("coordinator: {0}")]
    Endpoint(tonic::transport::Error),
    /// The configured training device is not available.
    #[error("device: {0}")]
    Device(meridian_models::DeviceError),
}

/// What is wrong with the site certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertificateProblem {
    /// It names no principal.
    #[error(transparent)]
    Unreadable(#[from] meridian_wire::identity::CertificateError),
    /// It names someone other than a hospital.
    #[error("certificate of {name} has role {role}, a worker needs role hospital")]
    NotHospital {
        /// Who it names.
        name: String,
        /// Their role.
        role: meridian_wire::identity::Role,
    },
}

/// What in the state directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The directory itself (or its outbox).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The privacy ledger.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The audit log.
    #[error(transparent)]
    Audit(#[from] meridian_store::audit::AuditError),
    /// The manual approvals table.
    #[error(transparent)]
    Approvals(#[from] ApprovalError),
}

/// Why a model was not pulled or an update not pushed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// A call to the coordinator failed.
    #[error(transparent)]
    Rpc(#[from] tonic::Status),
    /// The model announces more values than this machine can address.
    #[error("a model of {values} values does not fit in memory")]
    TooLarge {
        /// The values announced.
        values: u64,
    },
    /// No memory for the model.
    #[error("no memory for a model of {values} values: {refused}")]
    NoMemory {
        /// The values announced.
        values: u64,
        /// The allocator's refusal.
        refused: std::collections::TryReserveError,
    },
    /// The model was cut into no parts (a model of no values).
    #[error("a model cut into no parts")]
    NoParts,
    /// The model stream was silent for longer than the idle timeout.
    #[error("the model stream was silent for more than the idle timeout of {secs} s")]
    Silent {
        /// The idle timeout, in seconds.
        secs: u64,
    },
    /// The stream's first message was not a header.
    #[error("model stream did not start with a header")]
    NoHeader,
    /// A header after the first message.
    #[error("a second header in the model stream")]
    SecondHeader,
    /// The header names another layout or size than the job's.
    #[error("model layout {layout} / {values} values does not match the job's {wanted_layout} / {wanted_values}")]
    Layout {
        /// The header's layout hash.
        layout: String,
        /// The header's value count.
        values: u64,
        /// The job's layout hash.
        wanted_layout: String,
        /// The job's value count.
        wanted_values: u64,
    },
    /// The coordinator sent another range of values than the one asked for.
    #[error("the coordinator sent values {}..{} of the model for values {}..{}", .served.0, .served.0.saturating_add(.served.1), .asked.0, .asked.0.saturating_add(.asked.1))]
    WrongPart {
        /// First value and count sent.
        served: (u64, u64),
        /// First value and count asked for.
        asked: (u64, u64),
    },
    /// The coordinator predates parts and sent the whole model instead of
    /// the part asked for (nothing of it was read).
    #[error("the coordinator did not serve the model asked for")]
    NotServed,
    /// A chunk did not fit the values expected.
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// Both parts of an update were accepted but neither made it whole (the
    /// coordinator dropped the first while waiting for the second).
    #[error("the coordinator accepted both parts of the update but counted neither ({reason})")]
    Uncounted {
        /// The coordinator's reason on the first part.
        reason: String,
    },
}

impl TransferError {
    /// The gRPC code of the failure: the coordinator's own for a failed
    /// call, the nearest one otherwise. `Unavailable` marks a connection
    /// that could not be opened, after which a transfer in two parts is
    /// made whole over the session's connection.
    pub fn code(&self) -> Code {
        match self {
            TransferError::Rpc(status) => status.code(),
            TransferError::TooLarge { .. } => Code::InvalidArgument,
            TransferError::NoMemory { .. } => Code::ResourceExhausted,
            TransferError::NoParts => Code::Internal,
            TransferError::Silent { .. } => Code::DeadlineExceeded,
            TransferError::NoHeader
            | TransferError::SecondHeader
            | TransferError::Layout { .. }
            | TransferError::WrongPart { .. }
            | TransferError::NotServed
            | TransferError::Chunk(_) => Code::DataLoss,
            TransferError::Uncounted { .. } => Code::Aborted,
        }
    }
}

/// Why a session with the coordinator or a task of a job ended; logged at
/// the site, never sent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WorkerError {
    /// A call to the coordinator failed.
    #[error(transparent)]
    Rpc(#[from] tonic::Status),
    /// A model or an update did not cross the wire.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// No connection to the coordinator.
    #[error("cannot connect: {0}")]
    Connect(tonic::transport::Error),
    /// The coordinator ended the task stream.
    #[error("task stream closed")]
    StreamClosed,
    /// Blocking work on another thread panicked.
    #[error("{what} panicked: {source}")]
    Panicked {
        /// The work.
        what: &'static str,
        /// The join error the panic became.
        source: tokio::task::JoinError,
    },
    /// The ledger refused a read or a charge.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// A dataset could not be read.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// A task for a job this site never accepted.
    #[error("job {0} was not accepted here")]
    NotAccepted(String),
    /// An accepted job's recorded spec does not parse.
    #[error(transparent)]
    Spec(#[from] meridian_spec::job::SpecError),
    /// An update could not be written to or read from the outbox.
    #[error(transparent)]
    Outbox(#[from] meridian_store::checkpoint::CheckpointError),
    /// The job's model does not fit its data.
    #[error(transparent)]
    Layout(#[from] meridian_models::LayoutError),
    /// An evaluation failed.
    #[error(transparent)]
    Train(#[from] TrainError),
}

impl WorkerError {
    /// A panic in blocking work, named by `what`.
    pub(crate) fn panicked(what: &'static str) -> impl FnOnce(tokio::task::JoinError) -> WorkerError {
        move |source| WorkerError::Panicked { what, source }
    }
}
