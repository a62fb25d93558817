//! Subcommands and what they share: the server address, the client, logs
//! and progress bars.

pub mod bench;
pub mod check;
pub mod get;
pub mod put;
pub mod serve;
pub mod stat;

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use strata::addr::{AuthChannel, BearerToken, DEFAULT_TCP_LISTEN, PeerAddr, default_socket_path};
use strata::kinds::grpc::PeerOptions;
use strata::proto::snix::blob_service_client::BlobServiceClient;
use tonic::service::interceptor::InterceptedService;

/// The `--addr` flag shared by the client subcommands.
#[derive(clap::Args, Debug)]
pub struct AddrArg {
    /// Server address: grpc+http://HOST:PORT or grpc+unix:///PATH.
    /// Defaults to $STRATA_ADDR, then the local default listener.
    #[arg(long, env = "STRATA_ADDR")]
    pub addr: Option<String>,

    /// File holding a bearer token for a server that requires one.
    #[arg(long, env = "STRATA_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,

    /// PEM CA that may sign a grpc+https server's certificate.
    #[arg(long, env = "STRATA_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<std::path::PathBuf>,
}

impl AddrArg {
    /// The address to talk to.
    pub fn resolve(&self) -> anyhow::Result<PeerAddr> {
        match &self.addr {
            Some(a) => a.parse().context("--addr"),
            None => {
                let socket = default_socket_path();
                if socket.exists() {
                    Ok(PeerAddr::Unix(socket))
                } else {
                    Ok(PeerAddr::Http(DEFAULT_TCP_LISTEN.to_owned()))
                }
            }
        }
    }

    /// The token and CA to reach the server with.
    pub fn peer_options(&self) -> anyhow::Result<PeerOptions> {
        let token = match &self.token_file {
            Some(path) => Some(serve::read_token(path)?),
            None => None,
        };
        let ca_pem = match &self.ca_file {
            Some(path) => {
                Some(std::fs::read(path).with_context(|| format!("--ca-file {}", path.display()))?)
            }
            None => None,
        };
        Ok(PeerOptions {
            token,
            ca_pem,
            ..Default::default()
        })
    }

    /// A raw BlobService client for the address.
    pub fn client(&self) -> anyhow::Result<(PeerAddr, BlobServiceClient<AuthChannel>)> {
        let addr = self.resolve()?;
        let options = self.peer_options()?;
        let channel = addr
            .channel_with_ca(Duration::from_secs(5), options.ca_pem.as_deref())
            .with_context(|| format!("connecting to {addr}"))?;
        let token = BearerToken::new(options.token.as_deref()).context("--token-file")?;
        let client = BlobServiceClient::new(InterceptedService::new(channel, token))
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(strata::addr::DEFAULT_MAX_MESSAGE_SIZE);
        Ok((addr, client))
    }
}

/// Sets up `tracing` on stderr, filtered by `RUST_LOG` (default `level`).
/// With `STRATA_LOG_SPANS=close`, every span the filter lets through also
/// logs a line when it closes, with the time it was busy and idle: where a
/// slow request spent its time, tier call by tier call.
pub fn init_tracing(level: &str, json: bool) {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::fmt::format::FmtSpan;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let spans = match std::env::var("STRATA_LOG_SPANS").as_deref() {
        Ok("close") => FmtSpan::CLOSE,
        _ => FmtSpan::NONE,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(spans)
        // Colour codes only for a person at a terminal, not in log files.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// A byte progress bar on stderr, hidden when stderr is not a terminal.
pub fn progress(len: Option<u64>, label: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(len) => ProgressBar::new(len).with_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{msg} {bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.set_message(label.to_owned());
    bar
}

/// Parses a digest argument (hex or `blake3-<base64>`).
pub fn parse_digest(s: &str) -> anyhow::Result<strata::B3Digest> {
    s.parse().with_context(|| format!("bad digest {s:?}"))
}
