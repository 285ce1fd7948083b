//! The server's errors: a rich internal enum for people, and the small [`ErrorKind`] that
//! tells a caller what to do. Only the service layer turns a kind into a gRPC status.

use featurestore::InvalidRequest;

use crate::storage::StorageError;

/// What the caller should do about an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Fix the request; retrying it unchanged fails again.
    InvalidRequest,
    /// The request conflicts with an earlier one (an idempotency key reused).
    Conflict,
    /// The server is at a limit right now; retry later with backoff.
    Overloaded,
    /// The store cannot serve now; retry later.
    Unavailable,
    /// Stored data is damaged.
    DataLoss,
    /// A bug or an unexpected state in the server.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidRequest(#[from] InvalidRequest),
    #[error("features[{index}]: unknown feature {name:?}")]
    UnknownFeature { index: usize, name: String },
    #[error("idempotency key {key:?} was already used for a different request")]
    IdempotencyKeyReused { key: String },
    #[error("the server is at its limit of {limit} concurrent requests")]
    Overloaded { limit: usize },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the stored answer of an earlier write does not decode: {0}")]
    CorruptReplay(String),
    #[error("request task failed: {0}")]
    Task(String),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidRequest(_) | Error::UnknownFeature { .. } => ErrorKind::InvalidRequest,
            Error::IdempotencyKeyReused { .. } => ErrorKind::Conflict,
            Error::Overloaded { .. } => ErrorKind::Overloaded,
            Error::Storage(StorageError::Engine(_)) => ErrorKind::Unavailable,
            Error::Storage(StorageError::Corrupt(_)) | Error::CorruptReplay(_) => {
                ErrorKind::DataLoss
            }
            Error::Task(_) => ErrorKind::Internal,
        }
    }
}
