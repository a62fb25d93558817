//! [`StatClient`]: a peer's Stat answer taken apart by hand, so that a
//! blob sent inline (up to 512 KiB when a read follows) reaches the checks
//! as the bytes h2 received rather than a copy.
//!
//! tonic's generated client gathers the answer into a buffer of its own
//! before prost decodes it: a memcpy of every inline blob, into memory
//! freshly faulted in. The message comes out of the DATA frames through
//! [`crate::proto::pieces::messages`] instead, and prost decodes its
//! `bytes` fields as slices of it. Statuses keep tonic's rules, as in
//! `read_answer.rs`.

use futures::StreamExt;
use prost::Message;
use tonic::Status;

use super::raw_call::{self, Answer};
use crate::addr::AuthChannel;
use crate::proto::pieces;
use crate::proto::snix::{StatBlobRequest, StatBlobResponse};

/// Sends Stats to one peer over its channel.
#[derive(Clone)]
pub(super) struct StatClient {
    channel: AuthChannel,
    path: http::uri::PathAndQuery,
    max_message_size: usize,
}

impl StatClient {
    /// Stats of the BlobService named `service`, refusing answers larger
    /// than `max_message_size`.
    pub(super) fn new(channel: AuthChannel, service: &str, max_message_size: usize) -> Self {
        let path = raw_call::method_path(service, "Stat");
        StatClient {
            channel,
            path,
            max_message_size,
        }
    }

    /// Sends a Stat and returns its answer; an error status (NOT_FOUND,
    /// ...), a failed call or a malformed answer is the `Err`.
    pub(super) async fn stat(&self, request: &StatBlobRequest) -> Result<StatBlobResponse, Status> {
        let body =
            match raw_call::call(&self.channel, &self.path, raw_call::unary_body(request)).await? {
                Answer::Body(body) => body,
                // A unary answer without its message, as tonic words it.
                Answer::Status(status) if status.code() == tonic::Code::Ok => {
                    return Err(Status::internal("Missing response message."));
                }
                Answer::Status(status) => return Err(status),
            };
        let mut messages = pieces::messages(body, self.max_message_size, "a Stat answer", |t| {
            raw_call::trailers_ok(t.as_ref())
        });
        let message = match messages.next().await {
            Some(message) => message?,
            None => return Err(Status::internal("Missing response message.")),
        };
        // The rest is the end of the answer: its status, checked above.
        match messages.next().await {
            None => {}
            Some(Err(status)) => return Err(status),
            Some(Ok(_)) => {
                return Err(Status::internal(
                    "protocol error: a Stat answer of more than one message",
                ));
            }
        }
        StatBlobResponse::decode(message)
            .map_err(|e| Status::internal(format!("a Stat answer does not decode: {e}")))
    }
}
