//! Put requests taken apart by hand, so each payload reaches the writer as
//! the bytes h2 received rather than a copy.
//!
//! The request's `BlobChunk` payloads come out of its DATA frames through
//! [`pieces::payload`], where tonic's `Streaming` would first gather every
//! frame into a buffer of its own: one memcpy of every byte Put. The pieces
//! follow the frames rather than the messages, which the writer accepts
//! (it cuts chunks out of any pieces). Messages keep the server's size cap,
//! and a request that ends inside a message fails as tonic fails it.
//! Admission, tracing, metrics and the store are the shared handler's
//! ([`BlobServer::put_pieces`]).

use std::convert::Infallible;

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::StreamBody;
use prost::Message;
use tonic::body::Body;
use tonic::{Request, Status};

use super::service::{BlobServer, PieceStream};
use super::zero_copy::{grpc_response, refuse_compressed, trailers};
use crate::proto::pieces;
use crate::proto::snix::PutBlobResponse;
use crate::proto::wire::MESSAGE_HEADER;

/// A whole Put: the blob stored from the request's pieces, then the
/// response. A refusal or a failed store is a trailers-only response, as
/// tonic sends one for a failed unary answer.
pub(super) async fn put(
    server: BlobServer,
    package: &'static str,
    req: http::Request<Body>,
) -> http::Response<Body> {
    if let Err(status) = refuse_compressed(&req) {
        return status.into_http();
    }
    // The metadata and extensions (the bearer token, the peer address)
    // stay with the request; its body becomes the pieces.
    let (parts, body) = req.into_parts();
    let pieces = pieces(body, server.max_message_size());
    let request = Request::from_http(http::Request::from_parts(parts, pieces));
    match server.put_pieces(request, package).await {
        Ok(response) => grpc_response(Body::new(StreamBody::new(answer(&response)))),
        Err(status) => status.into_http(),
    }
}

/// The payload of the request's messages, piece by piece; a broken or
/// malformed body ends it with an error. Request trailers carry nothing
/// gRPC defines: any end of the body is a good one.
fn pieces(body: Body, max_message_size: usize) -> PieceStream {
    pieces::payload(body, max_message_size, "a Put request", |_| Ok(()))
}

/// The body of a successful Put's response: its one message, then the OK
/// status.
fn answer(
    response: &PutBlobResponse,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + 'static {
    let message = response.encode_to_vec();
    let mut framed = BytesMut::with_capacity(MESSAGE_HEADER + message.len());
    framed.put_u8(0);
    // A digest: far below 4 GiB.
    framed.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    framed.put_slice(&message);
    futures::stream::iter([
        Ok(Frame::data(framed.freeze())),
        Ok(Frame::trailers(trailers(&Status::ok("")))),
    ])
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tower::ServiceExt;

    use super::*;
    use crate::B3Digest;
    use crate::blobservice::BlobService;
    use crate::chunkstore::ChunkedBlobService;
    use crate::kinds::memory::MemoryStore;
    use crate::proto::snix::BlobChunk;
    use crate::server::ServeOptions;
    use crate::server::zero_copy::testing::{Svc, answer, serving};

    /// A request body's DATA frames, or the error that breaks it.
    type Frames = Vec<Result<Bytes, Status>>;

    fn empty_store() -> Arc<dyn BlobService> {
        Arc::new(ChunkedBlobService::new(MemoryStore::new(64 << 20)))
    }

    fn server(store: &Arc<dyn BlobService>, cap: usize) -> Svc {
        let opts = ServeOptions {
            max_message_size: cap,
            ..ServeOptions::default()
        };
        serving(store.clone(), &opts)
    }

    /// `blob` as the messages of a Put, `message` payload bytes each.
    fn wire(blob: &[u8], message: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in blob.chunks(message) {
            let encoded = BlobChunk {
                data: Bytes::copy_from_slice(piece),
            }
            .encode_to_vec();
            out.push(0);
            out.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
            out.extend_from_slice(&encoded);
        }
        out
    }

    /// A Put request whose body is `frames`, each one DATA frame.
    fn put_request(frames: Frames) -> http::Request<Body> {
        let frames = futures::stream::iter(frames.into_iter().map(|f| f.map(Frame::data)));
        http::Request::builder()
            .method("POST")
            .uri("/snix.castore.v1.BlobService/Put")
            .header("content-type", "application/grpc")
            .body(Body::new(StreamBody::new(frames)))
            .expect("a valid request")
    }

    /// `wire` cut into frames of `frame` bytes.
    fn framed(wire: &[u8], frame: usize) -> Frames {
        wire.chunks(frame)
            .map(|f| Ok(Bytes::copy_from_slice(f)))
            .collect()
    }

    async fn digest_of_answer(response: http::Response<Body>) -> Result<B3Digest, Status> {
        let (data, status) = answer(response).await;
        if status.code() != tonic::Code::Ok {
            return Err(status);
        }
        assert_eq!(data[0], 0);
        let response = PutBlobResponse::decode(data.slice(MESSAGE_HEADER..)).expect("decodes");
        Ok(B3Digest::try_from(&response.digest[..]).expect("a digest"))
    }

    #[tokio::test]
    async fn a_put_in_any_frames_stores_the_blob() {
        let blob = crate::testkit::pseudo_random(1 << 20, 3);
        let want = B3Digest::of(&blob);
        // Messages of several sizes, in frames that cut headers, keys and
        // varints anywhere.
        for (message, frame) in [(100_000, 1 << 20), (300_000, 7), (1 << 20, 4097), (5, 3)] {
            let store = empty_store();
            let svc = server(&store, 4 << 20);
            let req = put_request(framed(&wire(&blob, message), frame));
            let got = digest_of_answer(svc.oneshot(req).await.expect("infallible")).await;
            assert_eq!(
                got.expect("stored"),
                want,
                "messages of {message}, frames of {frame}"
            );
            let mut stored = Vec::new();
            let mut reader = store.open_read(&want).await.unwrap().expect("the blob");
            tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut stored)
                .await
                .unwrap();
            assert!(stored == blob);
        }
    }

    #[tokio::test]
    async fn the_generated_server_answers_a_put_the_same() {
        let blob = crate::testkit::pseudo_random(700_000, 5);
        let wire = wire(&blob, 64 << 10);
        let store = empty_store();
        let svc = server(&store, 4 << 20);
        let (ours, status) = answer(
            svc.clone()
                .oneshot(put_request(framed(&wire, 10_000)))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status.code(), tonic::Code::Ok, "{status:?}");
        let (theirs, status) = answer(
            svc.inner
                .oneshot(put_request(framed(&wire, 10_000)))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status.code(), tonic::Code::Ok, "{status:?}");
        assert_eq!(ours, theirs);
    }

    #[tokio::test]
    async fn a_malformed_or_broken_put_stores_nothing() {
        let blob = crate::testkit::pseudo_random(200_000, 8);
        let good = wire(&blob, 50_000);
        let mut compressed = good.clone();
        compressed[0] = 1;
        let cut_short = good[..good.len() - 10].to_vec();
        let mut broken = framed(&good[..120_000], 30_000);
        broken.push(Err(Status::cancelled("the client went away")));
        let cases: Vec<(&str, Frames, usize, tonic::Code)> = vec![
            (
                "compressed flag",
                framed(&compressed, 1000),
                1 << 20,
                tonic::Code::Internal,
            ),
            (
                "over the cap",
                framed(&good, 1000),
                40_000,
                tonic::Code::OutOfRange,
            ),
            (
                "ends inside a message",
                framed(&cut_short, 1000),
                1 << 20,
                tonic::Code::Internal,
            ),
            ("body error", broken, 1 << 20, tonic::Code::Cancelled),
        ];
        for (what, frames, cap, code) in cases {
            let store = empty_store();
            let svc = server(&store, cap);
            let response = svc.oneshot(put_request(frames)).await.unwrap();
            let status = digest_of_answer(response).await.expect_err(what);
            assert_eq!(status.code(), code, "{what}: {status:?}");
            assert!(!store.has(&B3Digest::of(&blob)).await.unwrap(), "{what}");
            assert!(
                !store.has(&B3Digest::of(&blob[..150_000])).await.unwrap(),
                "{what}"
            );
        }
        // A compressed request by its header, refused before its body.
        let store = empty_store();
        let mut gzip = put_request(framed(&good, 1000));
        gzip.headers_mut()
            .insert("grpc-encoding", http::HeaderValue::from_static("gzip"));
        let status = digest_of_answer(server(&store, 1 << 20).oneshot(gzip).await.unwrap())
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Unimplemented);
    }
}
