//! [`PutClient`]: a Put to a peer framed by hand, so each payload goes out
//! as the `Bytes` the writer was given rather than a copy.
//!
//! tonic's encoder writes every message into a buffer of its own: one
//! memcpy of every byte uploaded. Each piece here goes out as its
//! `BlobChunk` framing ([`framing`]) and then the piece itself, two DATA
//! frames h2 writes to the socket as they are. The answer, one small
//! message and a status, is read the way tonic reads a unary answer.

use bytes::{Buf, Bytes};
use futures::{Stream, StreamExt};
use http_body::Frame;
use http_body_util::{BodyExt, Limited, StreamBody};
use prost::Message;
use tonic::Status;
use tonic::body::Body;

use super::raw_call::{self, Answer};
use crate::addr::AuthChannel;
use crate::proto::pieces::framing;
use crate::proto::snix::PutBlobResponse;
use crate::proto::wire::MESSAGE_HEADER;

/// Largest Put answer read: one digest and its framing, with room to spare
/// for fields a newer peer may add.
const MAX_ANSWER: usize = 64 * 1024;

/// Sends Puts to one peer over its channel.
#[derive(Clone)]
pub(super) struct PutClient {
    channel: AuthChannel,
    path: http::uri::PathAndQuery,
}

impl PutClient {
    /// Puts to the BlobService named `service`
    /// (`snix.castore.v1.BlobService` or `tvix.castore.v1.BlobService`).
    pub(super) fn new(channel: AuthChannel, service: &str) -> Self {
        let path = raw_call::method_path(service, "Put");
        PutClient { channel, path }
    }

    /// Sends a Put whose messages carry `pieces`, one each, and returns
    /// the peer's answer once the request has ended and the peer answered.
    /// Dropping the future before then resets the call: the peer does not
    /// take what it received as a blob.
    pub(super) async fn put(
        &self,
        pieces: impl Stream<Item = Bytes> + Send + 'static,
    ) -> Result<PutBlobResponse, Status> {
        let frames = pieces.flat_map(|piece| {
            futures::stream::iter([
                Ok::<_, Status>(Frame::data(framing(piece.len()))),
                Ok(Frame::data(piece)),
            ])
        });
        let body = match raw_call::call(
            &self.channel,
            &self.path,
            Body::new(StreamBody::new(frames)),
        )
        .await?
        {
            Answer::Body(body) => body,
            // Trailers-only: an error, or an OK without the answer.
            Answer::Status(status) if status.code() == tonic::Code::Ok => {
                return Err(Status::internal(
                    "protocol error: a Put answered OK without a message",
                ));
            }
            Answer::Status(status) => return Err(status),
        };
        let answer = Limited::new(body, MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| match e.downcast::<Status>() {
                Ok(status) => *status,
                Err(e) => Status::internal(format!("a Put answer: {e}")),
            })?;
        raw_call::trailers_ok(answer.trailers())?;
        decode_answer(answer.to_bytes())
    }
}

/// The one uncompressed `PutBlobResponse` message that is all of `data`.
fn decode_answer(mut data: Bytes) -> Result<PutBlobResponse, Status> {
    let bad = |why: &str| Status::internal(format!("protocol error: a Put answer {why}"));
    if data.len() < MESSAGE_HEADER {
        return Err(bad("without its message"));
    }
    if data[0] != 0 {
        return Err(bad("compressed, but no compression was asked for"));
    }
    let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
    data.advance(MESSAGE_HEADER);
    if data.len() != len {
        return Err(bad("that is not one message"));
    }
    PutBlobResponse::decode(data).map_err(|e| bad(&format!("that does not decode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(message: &[u8]) -> Bytes {
        let mut out = vec![0u8];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out.into()
    }

    #[test]
    fn an_answer_is_exactly_one_message() {
        let answer = PutBlobResponse {
            digest: Bytes::from(vec![7u8; 32]),
        };
        let wire = framed(&answer.encode_to_vec());
        assert_eq!(decode_answer(wire.clone()).unwrap(), answer);

        let mut two = wire.to_vec();
        two.extend_from_slice(&wire);
        let mut compressed = wire.to_vec();
        compressed[0] = 1;
        for bad in [
            Bytes::new(),
            wire.slice(..3),
            wire.slice(..wire.len() - 1),
            Bytes::from(two),
            Bytes::from(compressed),
            framed(&[0xff, 0xff]),
        ] {
            let status = decode_answer(bad.clone()).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Internal, "{bad:?}");
        }
    }
}
