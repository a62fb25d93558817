//! strata: a layered, verifying, caching substituter for BLAKE3-addressed
//! blobs, speaking the snix/tvix castore `BlobService` gRPC protocol.
//!
//! * [`blobservice`]: the one trait every tier and the server speak.
//! * [`kinds`]: the tier kinds, one module each, and their registration.
//! * [`chunkstore`]: the chunk/index storage model shared by local tiers.
//! * [`verify`]: where every untrusted byte is checked.
//! * [`composition`]: composition files and the kind registry.
//! * [`server`]: the gRPC server and its listeners.
//! * [`metrics`]: the Prometheus registry and its `/metrics` endpoint.

#![warn(missing_docs)]

pub mod addr;
pub mod blobservice;
pub mod chunkstore;
pub mod composition;
pub mod digest;
pub mod error;
pub mod kinds;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod singleflight;
mod task;
pub mod testkit;
pub mod verify;

pub use digest::B3Digest;
pub use error::{Error, Result};
