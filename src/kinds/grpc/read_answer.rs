//! [`ReadClient`]: a peer's Read answer taken apart by hand, so its payload
//! reaches the verifier as the bytes h2 received rather than a copy.
//!
//! The payload comes out of the DATA frames through
//! [`crate::proto::pieces::Parser`], where tonic's `Streaming` would gather
//! every frame into a buffer first: one memcpy of the whole blob on every
//! fetch from a peer.
//!
//! Statuses keep tonic's rules: a trailers-only answer, the trailers'
//! `grpc-status`, an HTTP status mapped when the trailers are missing, and
//! transport and body errors carried with their source, so the tier can
//! still tell a broken connection from an answer.

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use http_body_util::BodyExt;
use prost::Message;
use tonic::Status;
use tonic::body::Body;
use tower::{Service, ServiceExt};

use crate::addr::AuthChannel;
use crate::proto::pieces::Parser;
use crate::proto::snix::ReadBlobRequest;
use crate::proto::wire::MESSAGE_HEADER;

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
        // Service names are the generated constants: always a valid path.
        let path = format!("/{service}/Read")
            .parse()
            .unwrap_or_else(|_| http::uri::PathAndQuery::from_static("/"));
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
        let mut channel = self.channel.clone();
        // As the generated client words it.
        channel
            .ready()
            .await
            .map_err(|e| Status::unknown(format!("Service was not ready: {e}")))?;
        let response = channel
            .call(self.http_request(&request))
            .await
            .map_err(|e| Status::from_error(e.into()))?;
        let (parts, body) = response.into_parts();
        if let Some(status) = Status::from_header_map(&parts.headers) {
            // Trailers-only: the whole answer is this status.
            return if status.code() == tonic::Code::Ok {
                Ok(futures::stream::empty().boxed())
            } else {
                Err(status)
            };
        }
        if parts.status != http::StatusCode::OK {
            // Not a gRPC answer (a proxy's error page, say).
            return Err(missing_status(parts.status));
        }
        Ok(payload(Body::new(body), self.max_message_size))
    }

    fn http_request(&self, request: &ReadBlobRequest) -> http::Request<Body> {
        let message = request.encode_to_vec();
        let mut framed = BytesMut::with_capacity(MESSAGE_HEADER + message.len());
        framed.put_u8(0);
        // A Read request is a digest: far below 4 GiB.
        framed.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
        framed.put_slice(&message);
        let mut req = http::Request::new(Body::new(http_body_util::Full::new(framed.freeze())));
        *req.method_mut() = http::Method::POST;
        *req.version_mut() = http::Version::HTTP_2;
        // The channel fills in the scheme and authority.
        *req.uri_mut() = http::Uri::from(self.path.clone());
        let headers = req.headers_mut();
        headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        req
    }
}

/// The payload pieces in `body`, then its final status: an error unless
/// the trailers say OK.
fn payload(mut body: Body, max_message_size: usize) -> Payload {
    Box::pin(async_stream::stream! {
        let mut parser = Parser::new(max_message_size, "a Read answer");
        loop {
            let frame = match body.frame().await {
                Some(Ok(frame)) => frame,
                Some(Err(status)) => {
                    yield Err(status);
                    return;
                }
                None => {
                    yield Err(missing_status(http::StatusCode::OK));
                    return;
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    parser.push(data);
                    for piece in parser.pieces() {
                        let failed = piece.is_err();
                        yield piece;
                        if failed {
                            return;
                        }
                    }
                }
                Err(frame) => {
                    let status = frame
                        .into_trailers()
                        .ok()
                        .and_then(|trailers| Status::from_header_map(&trailers))
                        .unwrap_or_else(|| missing_status(http::StatusCode::OK));
                    if status.code() != tonic::Code::Ok {
                        yield Err(status);
                    } else if let Err(status) = parser.finished() {
                        yield Err(status);
                    }
                    return;
                }
            }
        }
    })
}

/// The status of an answer that ended without `grpc-status`, mapped from
/// its HTTP status as gRPC's HTTP mapping (and tonic) do.
pub(super) fn missing_status(http_status: http::StatusCode) -> Status {
    use http::StatusCode as H;
    use tonic::Code;
    let code = match http_status {
        H::OK => {
            return Status::unknown(
                "protocol error: the answer ended without a grpc-status (cut short on the way?)",
            );
        }
        H::BAD_REQUEST => Code::Internal,
        H::UNAUTHORIZED => Code::Unauthenticated,
        H::FORBIDDEN => Code::PermissionDenied,
        H::NOT_FOUND => Code::Unimplemented,
        H::TOO_MANY_REQUESTS | H::BAD_GATEWAY | H::SERVICE_UNAVAILABLE | H::GATEWAY_TIMEOUT => {
            Code::Unavailable
        }
        _ => Code::Unknown,
    };
    Status::new(
        code,
        format!(
            "grpc-status missing, mapped from HTTP status {}",
            http_status.as_u16()
        ),
    )
}
