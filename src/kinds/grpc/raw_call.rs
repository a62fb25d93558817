//! What the `grpc` tier's hand-framed calls share (Reads in
//! `read_answer.rs`, Stats in `stat_answer.rs`, Puts in `put_request.rs`):
//! framing a unary request, sending the request over
//! the peer's channel and telling a gRPC answer from a trailers-only
//! status or something that is not gRPC at all, by tonic's rules.

use bytes::BufMut;
use tonic::Status;
use tonic::body::Body;
use tower::{Service, ServiceExt};

use crate::addr::AuthChannel;
use crate::proto::wire::MESSAGE_HEADER;

/// A call's answer, once its headers arrived.
pub(super) enum Answer {
    /// The answer's body: its messages, then the trailers with the status.
    Body(Body),
    /// A trailers-only answer: this status is all of it (OK included).
    Status(Status),
}

/// The request path of `method` of the gRPC service named `service`.
pub(super) fn method_path(service: &str, method: &str) -> http::uri::PathAndQuery {
    // Service names are the generated constants and methods literals:
    // always a valid path.
    format!("/{service}/{method}")
        .parse()
        .unwrap_or_else(|_| http::uri::PathAndQuery::from_static("/"))
}

/// `message` as the body of a unary request: the gRPC message header
/// (uncompressed), then the message.
pub(super) fn unary_body(message: &impl prost::Message) -> Body {
    let len = message.encoded_len();
    let mut framed = bytes::BytesMut::with_capacity(MESSAGE_HEADER + len);
    framed.put_u8(0);
    // Requests are a digest and a few flags: far below 4 GiB.
    framed.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    message.encode_raw(&mut framed);
    Body::new(http_body_util::Full::new(framed.freeze()))
}

/// Sends `body` as a gRPC request to `path` (`/<service>/<method>`) over
/// `channel`. A failed call, or an answer that is not gRPC (a proxy's
/// error page, say), is the `Err`.
pub(super) async fn call(
    channel: &AuthChannel,
    path: &http::uri::PathAndQuery,
    body: Body,
) -> Result<Answer, Status> {
    let mut channel = channel.clone();
    // As the generated client words it.
    channel
        .ready()
        .await
        .map_err(|e| Status::unknown(format!("Service was not ready: {e}")))?;
    let response = channel
        .call(request(path, body))
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let (parts, body) = response.into_parts();
    if let Some(status) = Status::from_header_map(&parts.headers) {
        return Ok(Answer::Status(status));
    }
    if parts.status != http::StatusCode::OK {
        return Err(missing_status(parts.status));
    }
    Ok(Answer::Body(Body::new(body)))
}

fn request(path: &http::uri::PathAndQuery, body: Body) -> http::Request<Body> {
    let mut req = http::Request::new(body);
    *req.method_mut() = http::Method::POST;
    *req.version_mut() = http::Version::HTTP_2;
    // The channel fills in the scheme and authority.
    *req.uri_mut() = http::Uri::from(path.clone());
    let headers = req.headers_mut();
    headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    req
}

/// The end of an answer's body, by its trailers (`None` if it had none):
/// fine if they say OK, else their status, or the one tonic gives an answer
/// that ended without a `grpc-status`.
pub(super) fn trailers_ok(trailers: Option<&http::HeaderMap>) -> Result<(), Status> {
    let status = trailers
        .and_then(Status::from_header_map)
        .unwrap_or_else(|| missing_status(http::StatusCode::OK));
    match status.code() {
        tonic::Code::Ok => Ok(()),
        _ => Err(status),
    }
}

/// The status of an answer that ended without `grpc-status`, mapped from
/// its HTTP status as gRPC's HTTP mapping (and tonic) do.
fn missing_status(http_status: http::StatusCode) -> Status {
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
