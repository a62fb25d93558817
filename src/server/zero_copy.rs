//! [`ZeroCopy`]: the BlobService's two bulk paths, Read answers and Put
//! requests, moved without tonic's codec so that no payload byte is copied
//! on its way through the server.
//!
//! tonic's codec copies every message it encodes or decodes into a buffer
//! of its own: one memcpy of each blob read or written, on top of the
//! socket's own. A `BlobChunk` is one `bytes` field, so both directions can
//! move the payload as the `Bytes` h2 sends or received:
//! [`super::read_path`] frames Read answers, [`super::put_path`] takes Put
//! requests apart. Every other method, and everything but the message
//! bodies of these two (admission, tracing, metrics), is the same code the
//! generated servers run.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tower::Service;

use super::service::BlobServer;
use super::{put_path, read_path};

/// Wraps a generated BlobService server `S`: its Read and Put are served
/// here, everything else by `S`.
#[derive(Clone)]
pub struct ZeroCopy<S> {
    /// The generated server (its own Read and Put are the tests' reference).
    pub(super) inner: S,
    server: BlobServer,
    package: &'static str,
    /// `/<package>.BlobService/Read`.
    read_path: Arc<str>,
    /// `/<package>.BlobService/Put`.
    put_path: Arc<str>,
}

impl<S: NamedService> ZeroCopy<S> {
    /// Serves `S`'s Read and Put from `server`; `package` names them in
    /// traces.
    pub fn new(inner: S, server: BlobServer, package: &'static str) -> Self {
        ZeroCopy {
            inner,
            server,
            package,
            read_path: format!("/{}/Read", S::NAME).into(),
            put_path: format!("/{}/Put", S::NAME).into(),
        }
    }
}

impl<S: NamedService> NamedService for ZeroCopy<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for ZeroCopy<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Generated servers are always ready; a call served here leaves
        // nothing reserved in them.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let server = self.server.clone();
        let package = self.package;
        let path = req.uri().path();
        if path == &*self.read_path {
            Box::pin(async move { Ok(read_path::read(server, package, req).await) })
        } else if path == &*self.put_path {
            Box::pin(async move { Ok(put_path::put(server, package, req).await) })
        } else {
            Box::pin(self.inner.call(req))
        }
    }
}

/// Refuses a compressed request the way tonic does: this server enables no
/// compression, and says which encoding it takes (`grpc-accept-encoding`),
/// as the gRPC compression spec asks and tonic's Stat answers do.
pub(super) fn refuse_compressed(req: &http::Request<Body>) -> Result<(), Status> {
    match req.headers().get("grpc-encoding") {
        Some(encoding) if encoding != "identity" => {
            let mut status = Status::unimplemented(format!(
                "Content is compressed with `{}` which isn't supported",
                String::from_utf8_lossy(encoding.as_bytes())
            ));
            status.metadata_mut().insert(
                "grpc-accept-encoding",
                tonic::metadata::MetadataValue::from_static("identity"),
            );
            Err(status)
        }
        _ => Ok(()),
    }
}

/// A gRPC response (HTTP 200, `application/grpc`) with `body`.
pub(super) fn grpc_response(body: Body) -> http::Response<Body> {
    let mut response = http::Response::new(body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// `status` as gRPC trailers.
pub(super) fn trailers(status: &Status) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        // Only details or metadata that cannot be header values land here
        // (the message is percent-encoded): the code goes alone.
        map.clear();
        let _ = Status::new(status.code(), "").add_header(&mut map);
    }
    map
}

/// Test helpers shared by the Read and Put paths' tests.
#[cfg(test)]
pub(super) mod testing {
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use prost::Message;

    use super::*;
    use crate::blobservice::BlobService;
    use crate::chunkstore::ChunkedBlobService;
    use crate::kinds::memory::MemoryStore;
    use crate::proto::snix::{BlobChunk, blob_service_server::BlobServiceServer};
    use crate::server::ServeOptions;

    /// The service the tests call.
    pub(crate) type Svc = ZeroCopy<BlobServiceServer<BlobServer>>;

    /// The wrapped snix server over a memory store holding `blob`, with
    /// `cap` as the largest message.
    pub(crate) async fn service(blob: &[u8], cap: usize) -> Svc {
        let store: Arc<dyn BlobService> =
            Arc::new(ChunkedBlobService::new(MemoryStore::new(64 << 20)));
        let mut w = store.open_write().await.unwrap();
        w.write(Bytes::copy_from_slice(blob)).await.unwrap();
        w.close().await.unwrap();
        let opts = ServeOptions {
            max_message_size: cap,
            ..ServeOptions::default()
        };
        serving(store, &opts)
    }

    /// The wrapped snix server over `store`.
    pub(crate) fn serving(store: Arc<dyn BlobService>, opts: &ServeOptions) -> Svc {
        let server = BlobServer::new(store, opts);
        ZeroCopy::new(BlobServiceServer::new(server.clone()), server, "snix")
    }

    /// A gRPC request to `method` carrying `message`, uncompressed.
    pub(crate) fn request(method: &str, message: &impl Message) -> http::Request<Body> {
        let encoded = message.encode_to_vec();
        let mut body = vec![0u8];
        body.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        body.extend_from_slice(&encoded);
        http::Request::builder()
            .method("POST")
            .uri(format!("/snix.castore.v1.BlobService/{method}"))
            .header("content-type", "application/grpc")
            .body(Body::new(http_body_util::Full::new(Bytes::from(body))))
            .unwrap()
    }

    /// The response's data (all frames, concatenated) and its status: from
    /// the trailers, or the headers of a trailers-only response.
    pub(crate) async fn answer(response: http::Response<Body>) -> (Bytes, Status) {
        let (parts, body) = response.into_parts();
        if let Some(status) = Status::from_header_map(&parts.headers) {
            return (Bytes::new(), status);
        }
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let status = Status::from_header_map(&trailers).expect("no grpc-status in the trailers");
        (collected.to_bytes(), status)
    }

    /// The payloads of the `BlobChunk` messages in `data`.
    pub(crate) fn payloads(mut data: Bytes) -> Vec<Bytes> {
        let mut out = Vec::new();
        while !data.is_empty() {
            assert_eq!(data[0], 0, "a compressed message");
            let len = u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize;
            let message = data.slice(5..5 + len);
            out.push(BlobChunk::decode(message).unwrap().data);
            data = data.slice(5 + len..);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use tower::ServiceExt;

    use super::testing::{answer, request, service};
    use super::*;

    #[tokio::test]
    async fn other_methods_go_to_the_generated_server() {
        let svc = service(b"held", 4 << 20).await;
        let stat = crate::proto::snix::StatBlobRequest {
            digest: crate::B3Digest::of(b"held").into(),
            ..Default::default()
        };
        let (data, status) = answer(svc.oneshot(request("Stat", &stat)).await.unwrap()).await;
        assert_eq!(status.code(), tonic::Code::Ok, "{status:?}");
        let stat = crate::proto::snix::StatBlobResponse::decode(data.slice(5..)).unwrap();
        assert_eq!(stat.size, 4);
    }

    #[test]
    fn trailers_carry_the_status() {
        let ok = trailers(&Status::ok(""));
        assert_eq!(ok["grpc-status"], "0");
        let lost = trailers(&Status::data_loss("chunk ab… does not match"));
        assert_eq!(lost["grpc-status"], "15");
        assert!(lost.contains_key("grpc-message"));
    }
}
