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

pub(crate) mod pieces;

/// Wire facts the hand-written Read paths (the server's framing, the
/// `grpc` tier's parsing) share: they move `BlobChunk` payloads without
/// tonic's codec, so that the payload bytes are never copied.
pub(crate) mod wire {
    /// A gRPC message header: one compression-flag byte, then the message
    /// length as a big-endian `u32`.
    pub const MESSAGE_HEADER: usize = 5;

    /// `BlobChunk.data`'s key: field 1, wire type 2 (length-delimited).
    /// It is the message's only field.
    pub const DATA_KEY: u8 = (1 << 3) | 2;
}
