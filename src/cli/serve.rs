//! `strata serve`: build the composition and serve it until SIGTERM/SIGINT.

use std::path::PathBuf;

use anyhow::Context;
use strata::addr::{DEFAULT_TCP_LISTEN, ListenAddr, default_socket_path};
use strata::composition::Composition;
use strata::server::{self, ServeOptions, TlsFiles};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Arguments of `strata serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Composition file (TOML). Without it, the embedded default is served.
    #[arg(long)]
    config: Option<PathBuf>,

    /// Address to listen on: HOST:PORT or a unix socket path. Repeatable;
    /// overrides the composition file's `[server] listen`.
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,

    /// Serve Prometheus metrics at http://HOST:PORT/metrics.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<std::net::SocketAddr>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let composition = match &args.config {
        Some(path) => Composition::load(path)?,
        None => Composition::default_composition()?,
    };
    let listen_text = if !args.listen.is_empty() {
        args.listen.clone()
    } else if !composition.server.listen.is_empty() {
        composition.server.listen.clone()
    } else {
        vec![
            DEFAULT_TCP_LISTEN.to_owned(),
            default_socket_path().display().to_string(),
        ]
    };
    let listen = listen_text
        .iter()
        .map(|a| a.parse::<ListenAddr>())
        .collect::<Result<Vec<_>, _>>()
        .context("--listen")?;

    let mut opts = ServeOptions {
        listen,
        metrics_listen: args.metrics_listen,
        ..Default::default()
    };
    if let Some(size) = composition.server.max_message_size {
        opts.max_message_size = usize::try_from(size.0).context("max_message_size")?;
    }
    if let Some(size) = composition.server.max_inline_size {
        opts.max_inline_size = size.0;
    }
    opts.read_only = composition.server.read_only;
    opts.max_put_size = composition.server.max_put_size.map(|s| s.0);
    if let Some(n) = composition.server.max_concurrent_requests {
        opts.max_concurrent_requests = n.get();
    }
    if let Some(n) = composition.server.max_concurrent_per_client {
        opts.max_concurrent_per_client = n.get();
    }
    if let Some(mode) = composition.server.socket_mode {
        opts.socket_mode = mode.0;
    }
    if let Some(grace) = composition.server.shutdown_grace {
        opts.shutdown_grace = grace.0;
    }

    if let Some(path) = &composition.server.token_file {
        opts.token = Some(read_token(path)?);
    }
    match (&composition.server.tls_cert, &composition.server.tls_key) {
        (Some(cert), Some(key)) => {
            opts.tls = Some(TlsFiles {
                cert_pem: std::fs::read(cert)
                    .with_context(|| format!("tls_cert {}", cert.display()))?,
                key_pem: std::fs::read(key)
                    .with_context(|| format!("tls_key {}", key.display()))?,
            });
        }
        (None, None) => {}
        _ => anyhow::bail!(
            "{}: [server] tls_cert and tls_key go together",
            composition.file
        ),
    }

    let root = composition
        .build_with_metrics(&opts.metrics)
        .await
        .context("building the tiers")?;
    info!(file = %composition.file, "tiers built:\n{}", composition.describe());

    let shutdown = CancellationToken::new();
    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        }
        trigger.cancel();
    });
    let served = server::serve(root.clone(), opts, shutdown).await;
    // Finish background work (queued fills) before exiting, for a bounded
    // time: fills only warm caches, and a stop must not hang on them.
    let drain = composition
        .server
        .fill_drain
        .map_or(server::DEFAULT_FILL_DRAIN, |d| d.0);
    root.shutdown(tokio::time::Instant::now() + drain)
        .await
        .context("finishing background work at shutdown")?;
    served
}

/// A bearer token from a file (surrounding whitespace ignored).
pub fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("token file {}", path.display()))?
        .trim()
        .to_owned();
    anyhow::ensure!(!token.is_empty(), "token file {} is empty", path.display());
    Ok(token)
}
