//! Read responses framed by hand, so each payload leaves as the bytes the
//! tiers hold rather than a copy.
//!
//! tonic's encoder writes every message into its own buffer: for a Read,
//! that is one memcpy of the whole blob on the server's hottest path, on top
//! of the socket's own. A `BlobChunk` is a single `bytes` field, so its
//! gRPC framing is a few bytes that can go out in front of the payload:
//! `[0][u32 length][tag 1, wire type 2][varint length]`, then the payload
//! itself, which h2 writes to the socket straight from the `Bytes` (it
//! chains large DATA payloads instead of copying them).
//!
//! Only the response is done by hand. The request is decoded by tonic
//! ([`Streaming`], with the server's message-size cap), and admission,
//! tracing and metrics are the shared handler's
//! ([`BlobServer::read_pieces`]).

use std::convert::Infallible;

use bytes::Bytes;
use futures::StreamExt;
use http_body::Frame;
use http_body_util::StreamBody;
use tonic::body::Body;
use tonic::codec::Streaming;
use tonic::{Request, Status};

use super::service::{BlobServer, PieceStream};
use super::zero_copy::{grpc_response, refuse_compressed, trailers};
use crate::proto::pieces::framing;
use crate::proto::snix::ReadBlobRequest;

/// A whole Read: the request decoded, the blob opened, the response's
/// body streaming its pieces. An error before the blob is open (a bad
/// request, an absent blob, a refusal) is a trailers-only response, as
/// tonic sends one; a later one travels in the body's trailers.
pub(super) async fn read(
    server: BlobServer,
    package: &'static str,
    req: http::Request<Body>,
) -> http::Response<Body> {
    let answer = async {
        let request = decode_request(req, super::MAX_REQUEST_MESSAGE).await?;
        server.read_pieces(request, package).await
    };
    match answer.await {
        Ok(pieces) => grpc_response(Body::new(StreamBody::new(frames(pieces)))),
        Err(status) => status.into_http(),
    }
}

/// The one `ReadBlobRequest` a Read carries, decoded by tonic, with the
/// request's metadata and extensions (the bearer token, the peer address).
async fn decode_request(
    req: http::Request<Body>,
    max_message_size: usize,
) -> Result<Request<ReadBlobRequest>, Status> {
    refuse_compressed(&req)?;
    let (parts, body) = req.into_parts();
    let decoder = tonic_prost::ProstDecoder::<ReadBlobRequest>::new(Default::default());
    let mut messages = Streaming::new_request(decoder, body, None, Some(max_message_size));
    let message = messages
        .message()
        .await?
        .ok_or_else(|| Status::internal("Missing request message."))?;
    Ok(Request::from_http(http::Request::from_parts(
        parts, message,
    )))
}

/// The response body: each piece as one `BlobChunk` message (its framing,
/// then the piece itself), then the trailers with the final status — an
/// error from `pieces` ends the body with that status.
fn frames(
    mut pieces: PieceStream,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + 'static {
    async_stream::stream! {
        let mut end = Status::ok("");
        while let Some(piece) = pieces.next().await {
            match piece {
                Ok(data) => {
                    yield Ok(Frame::data(framing(data.len())));
                    yield Ok(Frame::data(data));
                }
                Err(status) => {
                    end = status;
                    break;
                }
            }
        }
        yield Ok(Frame::trailers(trailers(&end)));
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::server::zero_copy::testing::{answer, payloads, request, service};

    fn read_of(blob: &[u8]) -> ReadBlobRequest {
        ReadBlobRequest {
            digest: crate::B3Digest::of(blob).into(),
        }
    }

    #[tokio::test]
    async fn a_read_answers_with_the_blob_in_messages_within_the_cap() {
        let blob = crate::testkit::pseudo_random(3 << 20, 9);
        let cap = 300_000;
        let svc = service(&blob, cap).await;
        let (data, status) =
            answer(svc.oneshot(request("Read", &read_of(&blob))).await.unwrap()).await;
        assert_eq!(status.code(), tonic::Code::Ok, "{status:?}");
        let pieces = payloads(data);
        assert!(pieces.len() > 1);
        assert!(pieces.iter().all(|p| !p.is_empty() && p.len() + 16 <= cap));
        assert_eq!(pieces.concat(), blob);
    }

    #[tokio::test]
    async fn the_generated_server_answers_a_read_with_the_same_payload() {
        let blob = crate::testkit::pseudo_random(1 << 20, 4);
        let svc = service(&blob, 4 << 20).await;
        let (ours, status) = answer(
            svc.clone()
                .oneshot(request("Read", &read_of(&blob)))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status.code(), tonic::Code::Ok, "{status:?}");
        let (theirs, status) = answer(
            svc.inner
                .oneshot(request("Read", &read_of(&blob)))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status.code(), tonic::Code::Ok, "{status:?}");
        assert_eq!(payloads(ours), payloads(theirs));
    }

    #[tokio::test]
    async fn an_absent_blob_is_a_trailers_only_not_found() {
        let svc = service(b"held", 4 << 20).await;
        let response = svc
            .oneshot(request("Read", &read_of(b"absent")))
            .await
            .unwrap();
        let (data, status) = answer(response).await;
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
        assert!(data.is_empty());
    }

    #[tokio::test]
    async fn a_compressed_or_oversize_request_is_refused() {
        let svc = service(b"held", 1024).await;
        let mut gzip = request("Read", &read_of(b"held"));
        gzip.headers_mut()
            .insert("grpc-encoding", http::HeaderValue::from_static("gzip"));
        let (_, status) = answer(svc.clone().oneshot(gzip).await.unwrap()).await;
        assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
        assert_eq!(
            status
                .metadata()
                .get("grpc-accept-encoding")
                .and_then(|v| v.to_str().ok()),
            Some("identity"),
            "{status:?}"
        );

        let huge = ReadBlobRequest {
            digest: Bytes::from(vec![1u8; 4096]),
        };
        let (_, status) = answer(svc.oneshot(request("Read", &huge)).await.unwrap()).await;
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    }

    #[tokio::test]
    async fn an_error_mid_stream_ends_the_body_with_its_status() {
        let pieces: PieceStream = Box::pin(futures::stream::iter(vec![
            Ok(Bytes::from_static(b"first")),
            Err(Status::data_loss("the peer lied")),
            Ok(Bytes::from_static(b"never sent")),
        ]));
        let mut body = Body::new(StreamBody::new(frames(pieces)));
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(bytes) => data.extend_from_slice(&bytes),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        assert_eq!(
            payloads(Bytes::from(data)),
            vec![Bytes::from_static(b"first")]
        );
        let status = Status::from_header_map(&trailers.unwrap()).unwrap();
        assert_eq!(status.code(), tonic::Code::DataLoss);
        assert_eq!(status.message(), "the peer lied");
    }
}
