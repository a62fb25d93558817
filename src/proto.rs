//! Generated protobuf and gRPC code for the castore BlobService.
//!
//! [`snix`] holds the message types (shared by both packages) and the
//! `snix.castore.v1.BlobService` client and server; [`tvix`] holds only the
//! `tvix.castore.v1.BlobService` client and server, over the same messages.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// `snix.castore.v1`: messages, client and server.
pub mod snix {
    tonic::include_proto!("snix.castore.v1");
}

/// `tvix.castore.v1`: client and server over the [`snix`] messages.
pub mod tvix {
    tonic::include_proto!("tvix.castore.v1");
}
