//! The library's error type.

use std::io;

use crate::digest::{B3Digest, DigestError};

/// Errors from blob services, tiers and the composition engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A digest was malformed (wrong length, bad text).
    #[error(transparent)]
    InvalidDigest(#[from] DigestError),

    /// A request was malformed in some other way.
    #[error("invalid request: {0}")]
    InvalidRequest(String),

    /// A tier could not be built from its configuration: the message names
    /// the file, the line and the tier.
    #[error("{0}")]
    Config(String),

    /// Data failed verification against the digest it was requested by.
    #[error("verification failed: {0}")]
    Verification(#[from] VerifyError),

    /// A peer answered with an error status or broke the connection.
    #[error("peer {peer}: {status}")]
    Peer {
        /// The peer's address.
        peer: String,
        /// What it said (or what went wrong talking to it).
        status: Box<tonic::Status>,
    },

    /// A peer could not be reached.
    #[error("peer {peer}: cannot connect: {message}")]
    Connect {
        /// The peer's address.
        peer: String,
        /// Why.
        message: String,
    },

    /// A blob that a store's index lists has lost one of its chunks.
    #[error("blob {blob} is incomplete: chunk {chunk} is missing")]
    MissingChunk {
        /// The blob being read.
        blob: B3Digest,
        /// The chunk that is gone.
        chunk: B3Digest,
    },

    /// Stored metadata (a blob index) cannot be parsed.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),

    /// A storage backend failed.
    #[error("storage backend: {0}")]
    Backend(String),

    /// Local I/O failed.
    #[error(transparent)]
    Io(#[from] io::Error),

    /// The error of a piece of work this request shared with others
    /// (single-flight).
    #[error(transparent)]
    Shared(std::sync::Arc<Error>),

    /// No tier could answer; every failure is listed.
    #[error("no tier could answer: {}", .0.join("; "))]
    AllTiersFailed(Vec<String>),

    /// The service does not take writes.
    #[error("read-only: {0}")]
    ReadOnly(String),

    /// A tier's circuit breaker is open after consecutive failures.
    #[error(
        "tier `{tier}` is skipped after consecutive failures (circuit open; next probe in {retry_in:?})"
    )]
    CircuitOpen {
        /// The tier's name.
        tier: String,
        /// Time until the breaker lets a probe through.
        retry_in: std::time::Duration,
    },

    /// A tier took longer than its `timeout`.
    #[error("tier `{tier}` timed out after {after:?}")]
    Timeout {
        /// The tier's name.
        tier: String,
        /// Its timeout.
        after: std::time::Duration,
    },
}

/// Ways in which data can fail to match the digest it was asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The bytes hash to something else.
    #[error("{what} {expected}: data hashes to {actual}")]
    DigestMismatch {
        /// "blob" or "chunk".
        what: &'static str,
        /// The digest asked for.
        expected: B3Digest,
        /// What the data hashed to.
        actual: B3Digest,
    },
    /// More or fewer bytes arrived than announced.
    #[error("{what} {expected}: expected {expected_len} bytes, got {actual_len}")]
    LengthMismatch {
        /// "blob" or "chunk".
        what: &'static str,
        /// The digest asked for.
        expected: B3Digest,
        /// The announced length.
        expected_len: u64,
        /// The length that arrived (or at least arrived, when it overran).
        actual_len: u64,
    },
    /// An outboard does not belong to the blob, or is malformed.
    #[error("outboard of blob {blob}: {why}")]
    BadOutboard {
        /// The blob the outboard was offered for.
        blob: B3Digest,
        /// What is wrong with it.
        why: String,
    },
    /// A chunk list that cannot be the blob's: a chunk larger than any
    /// store cuts ([`crate::blobservice::LARGEST_CHUNK`]), or sizes whose
    /// sum overflows.
    #[error(
        "chunk list of blob {blob}: a chunk is larger than {} bytes, or the sizes overflow",
        crate::blobservice::LARGEST_CHUNK
    )]
    BadChunkList {
        /// The blob the list was offered for.
        blob: B3Digest,
    },
    /// A group of bytes does not match the blob's outboard at its offset.
    #[error("blob {blob}: the {len} bytes at offset {offset} do not match its outboard")]
    GroupMismatch {
        /// The blob being read.
        blob: B3Digest,
        /// Where the bad group starts.
        offset: u64,
        /// How long it is.
        len: u64,
    },
}

/// The end of asking several tiers in turn when none had the blob: absent
/// (`Ok(None)`) if every tier said so, else an error listing each failure,
/// since a tier that failed might have had it.
pub fn absent_unless_failed<T>(failures: Vec<String>) -> Result<Option<T>> {
    if failures.is_empty() {
        Ok(None)
    } else {
        Err(Error::AllTiersFailed(failures))
    }
}

/// Shorthand for results with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The error behind any [`Error::Shared`] wrappers.
    pub fn root(&self) -> &Error {
        match self {
            Error::Shared(inner) => inner.root(),
            other => other,
        }
    }

    /// Wraps an error for `std::io` interfaces (`AsyncRead` and friends),
    /// keeping the original reachable through [`io::Error::get_ref`].
    pub fn into_io(self) -> io::Error {
        match self {
            Error::Io(e) => e,
            other => io::Error::other(other),
        }
    }

    /// Recovers a library error from an `io::Error` produced by
    /// [`Error::into_io`], or wraps a plain one.
    pub fn from_io(err: io::Error) -> Self {
        if !err.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            return Error::Io(err);
        }
        let kind = err.kind();
        match err.into_inner().map(|inner| inner.downcast::<Error>()) {
            Some(Ok(inner)) => *inner,
            Some(Err(other)) => Error::Io(io::Error::new(kind, other)),
            None => Error::Io(io::Error::from(kind)),
        }
    }
}
