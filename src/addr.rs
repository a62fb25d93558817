//! Addresses: where a gRPC peer is (`grpc+http://`, `grpc+https://`,
//! `grpc+unix://`) and where a server listens (`HOST:PORT` or a socket path),
//! plus the channel and transport settings shared by every client.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::Status;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// HTTP/2 stream window: large enough that a single blob stream is not
/// throttled by flow control on a fast link (the default is 64 KiB).
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// HTTP/2 connection window: room for several bulk streams at once.
pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
/// Largest HTTP/2 frame this side accepts (the default is 16 KiB): bulk
/// streams then go in fewer frames, each with less per-frame work.
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// Default cap on a single gRPC message, in both directions.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

/// Send buffer asked for on each unix socket this side connects (the
/// kernel caps it at `net.core.wmem_max`).
pub const UNIX_SEND_BUFFER: usize = 4 * 1024 * 1024;

/// Asks for a [`UNIX_SEND_BUFFER`] on `stream`. A unix stream's bytes in
/// flight are charged to the sender's buffer alone, and the default
/// (`net.core.wmem_default`, 208 KiB on most systems) is a fraction of
/// what TCP autotunes to: a 1 GiB Put into a sidecar over its unix socket
/// ran about a fifth slower than over loopback TCP (`docs/benchmarks.md`).
/// Best effort: a stream keeps working with the default.
fn widen_send_buffer(stream: &tokio::net::UnixStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_send_buffer_size(UNIX_SEND_BUFFER) {
        tracing::debug!(error = %e, "unix socket send buffer left at its default");
    }
}

/// The address of a gRPC BlobService peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAddr {
    /// `grpc+http://HOST:PORT`
    Http(String),
    /// `grpc+https://HOST:PORT`
    Https(String),
    /// `grpc+unix:///PATH`
    Unix(PathBuf),
}

/// Why an address did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid address {addr:?}: {reason}")]
pub struct AddrError {
    addr: String,
    reason: &'static str,
}

impl FromStr for PeerAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason| AddrError {
            addr: s.to_owned(),
            reason,
        };
        let authority = |rest: &str| -> Result<String, AddrError> {
            let rest = rest.trim_end_matches('/');
            if rest.is_empty() || rest.contains('/') {
                return Err(fail("expected HOST:PORT after the scheme"));
            }
            Ok(rest.to_owned())
        };
        if let Some(rest) = s.strip_prefix("grpc+http://") {
            Ok(PeerAddr::Http(authority(rest)?))
        } else if let Some(rest) = s.strip_prefix("grpc+https://") {
            Ok(PeerAddr::Https(authority(rest)?))
        } else if let Some(rest) = s.strip_prefix("grpc+unix:") {
            // Accept grpc+unix:///abs/path and grpc+unix:/abs/path.
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if !path.starts_with('/') {
                return Err(fail(
                    "expected an absolute socket path, as in grpc+unix:///run/x.sock",
                ));
            }
            Ok(PeerAddr::Unix(PathBuf::from(path)))
        } else {
            Err(fail("expected grpc+http://, grpc+https:// or grpc+unix://"))
        }
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Http(a) => write!(f, "grpc+http://{a}"),
            PeerAddr::Https(a) => write!(f, "grpc+https://{a}"),
            PeerAddr::Unix(p) => write!(f, "grpc+unix://{}", p.display()),
        }
    }
}

impl PeerAddr {
    /// A channel to the peer. It connects lazily, so a peer that is down at
    /// start-up does not stop the caller from starting, and reconnects after
    /// failures.
    pub fn channel(&self, connect_timeout: Duration) -> Result<Channel, tonic::transport::Error> {
        self.channel_with_ca(connect_timeout, None)
    }

    /// Selects rustls' `ring` provider for this process. Dependencies
    /// enable both `ring` and `aws-lc-rs`, and rustls then refuses to pick
    /// one by itself; strata's TLS (peers and serving) uses `ring`.
    pub fn install_crypto_provider() {
        // An error means a provider is installed already, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }

    /// Like [`PeerAddr::channel`]; a `grpc+https` peer's certificate may
    /// also be signed by the CA in `ca_pem` (besides the system's roots).
    pub fn channel_with_ca(
        &self,
        connect_timeout: Duration,
        ca_pem: Option<&[u8]>,
    ) -> Result<Channel, tonic::transport::Error> {
        let tune = |e: Endpoint| {
            e.connect_timeout(connect_timeout)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME_SIZE)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_while_idle(false)
        };
        if matches!(self, PeerAddr::Https(_)) {
            PeerAddr::install_crypto_provider();
        }
        Ok(match self {
            PeerAddr::Http(a) => tune(Endpoint::from_shared(format!("http://{a}"))?).connect_lazy(),
            PeerAddr::Https(a) => tune(
                Endpoint::from_shared(format!("https://{a}"))?.tls_config(match ca_pem {
                    Some(ca) => ClientTlsConfig::new()
                        .with_native_roots()
                        .ca_certificate(Certificate::from_pem(ca)),
                    None => ClientTlsConfig::new().with_native_roots(),
                })?,
            )
            .connect_lazy(),
            PeerAddr::Unix(path) => {
                let path = path.clone();
                // The URI is unused: the connector below ignores it.
                tune(Endpoint::from_static("http://unix.socket")).connect_with_connector_lazy(
                    tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            widen_send_buffer(&stream);
                            Ok::<_, std::io::Error>(TokioIo::new(stream))
                        }
                    }),
                )
            }
        })
    }
}

/// Adds `authorization: Bearer <token>` to every request, when a token is
/// set.
#[derive(Debug, Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

/// A channel whose requests carry a [`BearerToken`].
pub type AuthChannel = InterceptedService<Channel, BearerToken>;

impl BearerToken {
    /// Sends `token`, if any. Fails if it is not printable ASCII.
    pub fn new(token: Option<&str>) -> Result<Self, AddrError> {
        token
            .map(|t| {
                format!("Bearer {t}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| AddrError {
                        addr: "<token>".into(),
                        reason: "the token is not printable ASCII",
                    })
            })
            .transpose()
            .map(BearerToken)
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `HOST:PORT`
    Tcp(String),
    /// A filesystem path for a unix socket.
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(PeerAddr::Unix(path)) = s.parse::<PeerAddr>() {
            return Ok(ListenAddr::Unix(path));
        }
        if s.contains('/') {
            return Ok(ListenAddr::Unix(PathBuf::from(s)));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(ListenAddr::Tcp(s.to_owned()))
            }
            _ => Err(AddrError {
                addr: s.to_owned(),
                reason: "expected HOST:PORT or a unix socket path",
            }),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => f.write_str(a),
            ListenAddr::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The default TCP listener.
pub const DEFAULT_TCP_LISTEN: &str = "127.0.0.1:8000";

/// The default unix socket: `$XDG_RUNTIME_DIR/strata/strata.sock`, or
/// `/tmp/strata-$UID/strata.sock` where there is no runtime directory.
pub fn default_socket_path() -> PathBuf {
    match dirs::runtime_dir() {
        Some(dir) => dir.join("strata").join("strata.sock"),
        None => std::env::temp_dir()
            .join(format!("strata-{}", rustix::process::getuid().as_raw()))
            .join("strata.sock"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_unix_socket_sends_from_a_wider_buffer() {
        let (ours, _theirs) = tokio::net::UnixStream::pair().unwrap();
        let size = || socket2::SockRef::from(&ours).send_buffer_size().unwrap();
        let before = size();
        widen_send_buffer(&ours);
        // Linux doubles what it is asked for (the double is its bookkeeping
        // allowance), up to twice `net.core.wmem_max`.
        let max: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(size(), 2 * UNIX_SEND_BUFFER.min(max), "was {before}");
    }

    #[test]
    fn peer_addresses() {
        assert_eq!(
            "grpc+http://127.0.0.1:8000".parse(),
            Ok(PeerAddr::Http("127.0.0.1:8000".into()))
        );
        assert_eq!(
            "grpc+https://cache.example:443/".parse(),
            Ok(PeerAddr::Https("cache.example:443".into()))
        );
        assert_eq!(
            "grpc+unix:///run/strata.sock".parse(),
            Ok(PeerAddr::Unix("/run/strata.sock".into()))
        );
        assert!("http://x:1".parse::<PeerAddr>().is_err());
        assert!("grpc+unix://relative".parse::<PeerAddr>().is_err());
        assert!("grpc+http://x:1/path".parse::<PeerAddr>().is_err());
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            "127.0.0.1:8000".parse(),
            Ok(ListenAddr::Tcp("127.0.0.1:8000".into()))
        );
        assert_eq!("[::1]:9".parse(), Ok(ListenAddr::Tcp("[::1]:9".into())));
        assert_eq!(
            "/run/s.sock".parse(),
            Ok(ListenAddr::Unix("/run/s.sock".into()))
        );
        assert!("nonsense".parse::<ListenAddr>().is_err());
    }
}
