//! [`ReadClient`]: a peer's Read answer taken apart by hand, so its payload
//! reaches the verifier as the bytes h2 received rather than a copy.
//!
//! The payload comes out of the DATA frames through
//! [`crate::proto::pieces::payload`], where tonic's `Streaming` would gather
//! every frame into a buffer first: one memcpy of the whole blob on every
//! fetch from a peer.
//!
//! Statuses keep tonic's rules: a trailers-only answer, the trailers'
//! `grpc-status`, an HTTP status mapped when the trailers are missing, and
//! transport and body errors carried with their source, so the tier can
//! still tell a broken connection from an answer.

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use tonic::Status;
use tonic::body::Body;

use super::raw_call::{self, Answer};
use crate::addr::AuthChannel;
use crate::proto::pieces;
use crate::proto::snix::ReadBlobRequest;

/// The payload of a Read answer, in pieces; an error ends it.
pub(super) type Payload = BoxStream<'static, Result<Bytes, Status>>;

/// Sends Reads to one peer over its channel.
#[derive(Clone)]
pub(super) struct ReadClient {
    channel: AuthChannel,
    path: http::uri::PathAndQuery,
    max_message_size: usize,
}

impl ReadClient {
    /// Reads of the BlobService named `service`
    /// (`snix.castore.v1.BlobService` or `tvix.castore.v1.BlobService`),
    /// refusing messages larger than `max_message_size`.
    pub(super) fn new(channel: AuthChannel, service: &str, max_message_size: usize) -> Self {
        let path = raw_call::method_path(service, "Read");
        ReadClient {
            channel,
            path,
            max_message_size,
        }
    }

    /// Sends a Read and returns its answer's payload once the response
    /// headers arrived: an error status the peer answered with at once
    /// (NOT_FOUND, ...) or a failed call is the `Err`.
    pub(super) async fn read(&self, request: ReadBlobRequest) -> Result<Payload, Status> {
        let body = raw_call::unary_body(&request);
        match raw_call::call(&self.channel, &self.path, body).await? {
            Answer::Body(body) => Ok(payload(body, self.max_message_size)),
            Answer::Status(status) if status.code() == tonic::Code::Ok => {
                Ok(futures::stream::empty().boxed())
            }
            Answer::Status(status) => Err(status),
        }
    }
}

/// The payload pieces in `body`, then its final status: an error unless
/// the trailers say OK.
fn payload(body: Body, max_message_size: usize) -> Payload {
    pieces::payload(body, max_message_size, "a Read answer", |trailers| {
        raw_call::trailers_ok(trailers.as_ref())
    })
}
