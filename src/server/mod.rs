//! The gRPC server: the BlobService under both package names, the gRPC
//! health service, and the TCP and unix-socket listeners.

mod limits;
mod put_path;
mod read_path;
mod service;
mod zero_copy;

pub use limits::{DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_CONCURRENT_PER_CLIENT};
pub use service::{BlobServer, to_status};

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tracing::{info, warn};

use crate::addr::{
    CONNECTION_WINDOW, DEFAULT_MAX_MESSAGE_SIZE, ListenAddr, MAX_FRAME_SIZE, PeerAddr,
    STREAM_WINDOW,
};
use crate::blobservice::BlobService;
use crate::metrics::{Metrics, serve_metrics};
use crate::proto::{snix, tvix};
use zero_copy::ZeroCopy;

/// Default cap on blobs returned inline by Stat.
pub const DEFAULT_MAX_INLINE_SIZE: u64 = 1024 * 1024;

/// The largest Stat or Read request message taken. Each is a digest and a
/// few small fields, under 100 bytes; one announced larger is refused at
/// its length prefix, so a stream that never completes its request holds
/// no more than this (its bearer token is checked once the request is
/// whole).
pub const MAX_REQUEST_MESSAGE: usize = 4 << 10;
/// Streams one connection may have open at once. h2 leaves them unbounded
/// unless told; a client past it waits for a stream to end, as HTTP/2
/// clients do. With [`MAX_REQUEST_MESSAGE`] it bounds what one connection's
/// unfinished requests hold.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
/// How long a connection may be silent before the server pings it.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Default time in-flight requests get to finish after shutdown begins.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Default time queued async fills get once the server has stopped.
pub const DEFAULT_FILL_DRAIN: Duration = Duration::from_secs(15);

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where to listen.
    pub listen: Vec<ListenAddr>,
    /// Largest message accepted from a client.
    pub max_message_size: usize,
    /// Largest blob Stat returns inline.
    pub max_inline_size: u64,
    /// Refuse Puts.
    pub read_only: bool,
    /// Largest blob a Put may carry, if capped.
    pub max_put_size: Option<u64>,
    /// Requests served at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: usize,
    /// Requests from one client served at once.
    pub max_concurrent_per_client: usize,
    /// Permissions of unix sockets.
    pub socket_mode: u32,
    /// How long requests in flight may take to finish once shutdown
    /// begins; the connections still open then are dropped.
    pub shutdown_grace: Duration,
    /// Where RPCs (and, if the tiers were built with it, tiers) are
    /// counted.
    pub metrics: Metrics,
    /// Where to serve `/metrics`, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// A bearer token every BlobService request must carry, if set.
    pub token: Option<String>,
    /// PEM certificate chain and private key: TCP listeners speak TLS.
    pub tls: Option<TlsFiles>,
}

/// A server's TLS identity, as PEM.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain.
    pub cert_pem: Vec<u8>,
    /// The private key.
    pub key_pem: Vec<u8>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            listen: Vec::new(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_inline_size: DEFAULT_MAX_INLINE_SIZE,
            read_only: false,
            max_put_size: None,
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT,
            max_concurrent_per_client: DEFAULT_MAX_CONCURRENT_PER_CLIENT,
            socket_mode: 0o660,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            metrics: Metrics::new(),
            metrics_listen: None,
            token: None,
            tls: None,
        }
    }
}

/// A bound listener, ready to serve.
enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

/// Binds every listener up front, so a bad address fails before anything
/// is served.
async fn bind(addr: &ListenAddr, socket_mode: u32) -> std::io::Result<Bound> {
    match addr {
        ListenAddr::Tcp(a) => Ok(Bound::Tcp(TcpListener::bind(a.as_str()).await?)),
        ListenAddr::Unix(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            remove_stale_socket(path).await?;
            let listener = UnixListener::bind(path)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(socket_mode))?;
            Ok(Bound::Unix(listener, path.clone()))
        }
    }
}

/// Removes a socket file left by a server that is gone; refuses to touch one
/// that a live server still answers on, or anything that is not a socket.
async fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("another server is listening on {}", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

/// Serves `service` on every listener in `opts` until `shutdown` is
/// cancelled, then lets in-flight requests finish, for at most
/// `opts.shutdown_grace`: a client that never ends its request (a Put
/// stream left open, a Read it stops consuming) must not hold the process
/// forever. The connections still open then are dropped — their clients see
/// an error, never a short success, since a gRPC response without its final
/// status is an error — and this returns `Ok`.
pub async fn serve(
    service: Arc<dyn BlobService>,
    opts: ServeOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Metrics first: once the blob listeners accept, a scrape works too.
    if let Some(addr) = opts.metrics_listen {
        serve_metrics(addr, opts.metrics.clone(), shutdown.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    }
    let mut bound = Vec::new();
    for addr in &opts.listen {
        let b = bind(addr, opts.socket_mode)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        bound.push(b);
    }
    if bound.is_empty() {
        anyhow::bail!("no listeners configured");
    }

    let server = BlobServer::new(service, &opts);
    // Read and Put move their payloads without tonic's per-message copy;
    // the rest (Stat) is the generated servers'.
    let snix_svc = ZeroCopy::new(
        snix::blob_service_server::BlobServiceServer::new(server.clone())
            .max_decoding_message_size(MAX_REQUEST_MESSAGE)
            .max_encoding_message_size(opts.max_message_size),
        server.clone(),
        "snix",
    );
    let tvix_svc = ZeroCopy::new(
        tvix::blob_service_server::BlobServiceServer::new(server.clone())
            .max_decoding_message_size(MAX_REQUEST_MESSAGE)
            .max_encoding_message_size(opts.max_message_size),
        server,
        "tvix",
    );
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<snix::blob_service_server::BlobServiceServer<BlobServer>>()
        .await;
    health
        .set_serving::<tvix::blob_service_server::BlobServiceServer<BlobServer>>()
        .await;
    let routes = Routes::new(snix_svc)
        .add_service(tvix_svc)
        .add_service(health_svc);

    let builder = || {
        Server::builder()
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            // A client that vanishes (powered off, a cable pulled) sends no
            // FIN; without pings its streams, and the admission slots they
            // hold, would stay open for as long as the server waits on it.
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .tcp_nodelay(true)
    };
    if opts.tls.is_some() {
        PeerAddr::install_crypto_provider();
    }
    let tls = opts
        .tls
        .as_ref()
        .map(|t| ServerTlsConfig::new().identity(Identity::from_pem(&t.cert_pem, &t.key_pem)));

    let mut tasks = tokio::task::JoinSet::new();
    let mut sockets = Vec::new();
    for b in bound {
        let routes = routes.clone();
        let stop = shutdown.clone().cancelled_owned();
        match b {
            Bound::Tcp(listener) => {
                info!(addr = %listener.local_addr()?, tls = tls.is_some(), "listening (tcp)");
                let incoming = TcpIncoming::from(listener)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(KEEPALIVE_INTERVAL));
                let mut server = builder();
                if let Some(tls) = &tls {
                    server = server
                        .tls_config(tls.clone())
                        .map_err(|e| anyhow::anyhow!("TLS certificate or key: {e}"))?;
                }
                let router = server.add_routes(routes);
                tasks.spawn(async move {
                    router
                        .serve_with_incoming_shutdown(incoming, stop)
                        .await
                        .map_err(anyhow::Error::from)
                });
            }
            Bound::Unix(listener, path) => {
                info!(path = %path.display(), "listening (unix)");
                sockets.push(path.clone());
                let incoming = UnixListenerStream::new(listener);
                let router = builder().add_routes(routes);
                tasks.spawn(async move {
                    let result = router.serve_with_incoming_shutdown(incoming, stop).await;
                    let _ = std::fs::remove_file(&path);
                    result.map_err(anyhow::Error::from)
                });
            }
        }
    }
    let grace = opts.shutdown_grace;
    let grace_over = async {
        shutdown.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    let mut grace_over = std::pin::pin!(grace_over);
    loop {
        tokio::select! {
            done = tasks.join_next() => match done {
                Some(done) => done??,
                None => return Ok(()),
            },
            () = &mut grace_over => {
                warn!(?grace, "shutdown grace period over: no longer waiting for the connections still open");
                // The connections are tasks of their own: they end when the
                // runtime does, once the caller's drain of queued fills
                // (bounded by `fill_drain`) is over. Until then they may
                // finish; no new one is accepted.
                tasks.abort_all();
                for path in sockets {
                    let _ = std::fs::remove_file(path);
                }
                return Ok(());
            }
        }
    }
}
