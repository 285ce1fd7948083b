//! The server's errors: a rich internal enum for people, and the small [`ErrorKind`] that
//! tells a caller what to do. Only the service layer turns a kind into a gRPC status.

use featurestore::InvalidRequest;
use featurestore::proto::ReasonCode;

use crate::storage::StorageError;

/// What the caller should do about an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Fix the request; retrying it unchanged fails again.
    InvalidRequest,
    /// The thing asked for does not exist.
    NotFound,
    /// The write-time policy refuses the whole request; the reason says why.
    DeniedByPolicy,
    /// The request conflicts with the current state (an idempotency key reused, a user
    /// state changed since the caller read it).
    Conflict,
    /// The caller's principal may not do this (a surface it may not read, a source it
    /// may not write).
    PermissionDenied,
    /// The request lost a race; retrying it is safe and will likely succeed.
    Aborted,
    /// The server is at a limit right now; retry later with backoff.
    Overloaded,
    /// The caller's deadline passed before the work started; nothing was done.
    DeadlineExceeded,
    /// The store cannot serve now; retry later.
    Unavailable,
    /// Stored data is damaged.
    DataLoss,
    /// The server's storage backend does not offer this.
    Unsupported,
    /// A bug or an unexpected state in the server.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidRequest(#[from] InvalidRequest),
    #[error("features[{index}]: unknown feature {name:?}")]
    UnknownFeature { index: usize, name: String },
    #[error("{0}; the bundle in force is unchanged")]
    InvalidBundle(String),
    #[error("user {user_id} has no user state")]
    NoUserState { user_id: u64 },
    #[error("rows[{row}]: refused by policy: {}", crate::policy::bundle::reason_name(*reason))]
    Refused {
        reason: ReasonCode,
        row: usize,
        current_generation: u64,
    },
    #[error("the state of user {user_id} kept changing while the write was decided; retry it")]
    WriteRaced { user_id: u64 },
    #[error("idempotency key {key:?} was already used for a different request")]
    IdempotencyKeyReused { key: String },
    #[error("the server is at its limit of {limit} concurrent requests")]
    Overloaded { limit: usize },
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("the request's deadline passed before its work started; nothing was done")]
    DeadlinePassed,
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the stored answer of an earlier write does not decode: {0}")]
    CorruptReplay(String),
    #[error("request task failed: {0}")]
    Task(String),
    #[error("{0}")]
    Ledger(String),
    #[error("backup failed: {0}")]
    Backup(String),
    #[error("no erasure receipt {id:?}")]
    NoReceipt { id: String },
    /// Data of the user was still found after every attempt to delete it; the erasure
    /// stays pending and runs again at the next start.
    #[error("erasure {receipt}: data of the user was still found after {attempts} deletions")]
    ErasureUnverified { receipt: String, attempts: usize },
    #[error("the server is stopping")]
    Stopping,
    #[error("no bulk-load job {job_id:?}")]
    NoLoadJob { job_id: String },
    /// The job is not in a state that allows the request (chunk after commit, a gap in the
    /// sequence, a resume from another input, ...).
    #[error("bulk-load job {job_id:?}: {problem}")]
    LoadJobConflict { job_id: String, problem: String },
    /// The storage engine does not offer what the request needs.
    #[error("the storage backend does not offer {capability}")]
    Unsupported { capability: &'static str },
    #[error("bulk-load job {job_id:?} is attached to another stream; retry once it ends")]
    LoadJobBusy { job_id: String },
    /// The staging files of a job cannot be written or read.
    #[error("bulk-load job {job_id:?}: staging: {problem}")]
    Staging { job_id: String, problem: String },
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidRequest(_) | Error::UnknownFeature { .. } | Error::InvalidBundle(_) => {
                ErrorKind::InvalidRequest
            }
            Error::NoUserState { .. } | Error::NoReceipt { .. } | Error::NoLoadJob { .. } => {
                ErrorKind::NotFound
            }
            Error::Refused { .. } => ErrorKind::DeniedByPolicy,
            Error::IdempotencyKeyReused { .. }
            | Error::LoadJobConflict { .. }
            | Error::Storage(StorageError::GenerationChanged { .. })
            | Error::Storage(StorageError::IdempotencyKeyReused) => ErrorKind::Conflict,
            Error::WriteRaced { .. } | Error::LoadJobBusy { .. } => ErrorKind::Aborted,
            Error::Overloaded { .. } => ErrorKind::Overloaded,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::DeadlinePassed => ErrorKind::DeadlineExceeded,
            Error::PermissionDenied(_) => ErrorKind::PermissionDenied,
            Error::Storage(StorageError::Engine(_)) => ErrorKind::Unavailable,
            Error::Storage(StorageError::Corrupt(_)) | Error::CorruptReplay(_) => {
                ErrorKind::DataLoss
            }
            Error::Task(_)
            | Error::Storage(StorageError::Unfenced { .. })
            | Error::ErasureUnverified { .. } => ErrorKind::Internal,
            Error::Ledger(_) | Error::Backup(_) | Error::Stopping | Error::Staging { .. } => {
                ErrorKind::Unavailable
            }
        }
    }
}
