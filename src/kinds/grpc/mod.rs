//! `grpc`: a peer BlobService (strata, snix or tvix) over gRPC.
//!
//! ```toml
//! [blobservices.peer]
//! type = "grpc"
//! url = "grpc+http://10.0.0.7:8000"   # or grpc+https://…, grpc+unix:///…
//! protocol = "snix"                   # or "tvix"; default "snix"
//! ```
//!
//! Nothing a peer sends is trusted. Stat asks for the blob's chunk list and
//! its outboard (at 16 KiB groups); an outboard that does not hash to the
//! digest fails the call. Reads then take one of two paths:
//!
//! * chunk list and outboard known (a strata peer): the chunks are read by
//!   digest, a few in flight, each checked against its digest and, group by
//!   group, against the outboard; bytes are released as their group matches,
//!   seeks fetch only the chunks covering the target, and a lie ends the read
//!   at the first bad group.
//! * otherwise (stock snix/tvix peers, small blobs): the blob streams into a
//!   spool (memory for small blobs, a temporary file beyond that) through
//!   [`crate::verify::StreamVerifier`] — and through the outboard, when
//!   there is one, so a lie is dropped early — and a reader is handed out
//!   only once the whole blob hashed to the digest asked for.
//!
//! Writes hash locally and check the digest the peer reports.
//!
//! # Retries
//!
//! A call that cannot have had any effect yet and whose answer nobody has
//! seen — a Stat, or a Read before its first message arrived — is repeated
//! when the connection failed (refused, reset, broken before an answer):
//! up to `retries` more times, after an exponentially growing, jittered
//! delay starting at `retry_backoff`. An answer from the peer (NOT_FOUND, an
//! error status it sent, data that fails verification) and a timeout are
//! never retried, nor is a Put (the client decides). The whole series is one
//! call to the tier's circuit breaker and timeout wrappers, so it counts as
//! at most one failure.
//!
//! # Whole-request bound
//!
//! `request_timeout` (off by default) bounds a Stat with its retries, and a
//! Read from the moment it is opened to the last byte fetched from the
//! peer, however steadily the bytes trickle in.

mod inlined;
mod put_request;
mod raw_call;
mod read_answer;
mod stat_answer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::{BoxStream, Peekable};
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tracing::{debug, instrument, warn};

use crate::addr::{BearerToken, DEFAULT_MAX_MESSAGE_SIZE, PeerAddr};
use crate::blobservice::{
    BlobReader, BlobService, BlobStat, BlobWriter, BufferedReader, ChunkMeta, ChunkStream,
    PutResult, check_chunk_size, listed_len,
};
use crate::chunkstore::{ChunkedReader, OpenStream, ServiceChunks, StreamedReader};
use crate::composition::{BuildContext, TierConfig};
use crate::digest::B3Digest;
use crate::error::{Error, Result, VerifyError};
use crate::proto::snix::{PutBlobResponse, ReadBlobRequest, StatBlobRequest, StatBlobResponse};
use crate::proto::{snix, tvix};
use crate::verify::bao::MAX_VERIFY_SHIFT;
use crate::verify::{Outboard, STORED_SHIFT, cut_chunks, spool_verified, verify_chunk_meta};
use inlined::{INLINE_MAX, Inlined};
use put_request::PutClient;
use read_answer::{Payload, ReadClient};
use stat_answer::StatClient;

/// Chunks read ahead of the read position on the chunked path.
const READ_AHEAD: usize = 8;

/// What a peer's Stat said, checked.
struct PeerStat {
    /// `None` when a stock peer gave neither a size nor a chunk list.
    size: Option<u64>,
    chunks: Vec<ChunkMeta>,
    /// Checked against the digest; `None` if the peer sent none (or one too
    /// coarse to stream with).
    outboard: Option<Outboard>,
    /// The whole blob, if it was asked for inline and the peer sent it
    /// (unchecked).
    inline: Bytes,
}

/// Largest message sent in a Put stream.
const PUT_MESSAGE_SIZE: usize = 1024 * 1024;

/// Which package name the peer serves the BlobService under.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// `snix.castore.v1.BlobService`
    #[default]
    Snix,
    /// `tvix.castore.v1.BlobService`
    Tvix,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Snix => "snix",
            Protocol::Tvix => "tvix",
        })
    }
}

/// Configuration of a `grpc` tier.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    /// The peer's address.
    #[serde(deserialize_with = "deserialize_peer_addr")]
    pub url: PeerAddr,
    /// The package name the peer speaks.
    #[serde(default)]
    pub protocol: Protocol,
    /// Directory for spooling large blobs while they are verified (default:
    /// the system temporary directory).
    pub spool_dir: Option<PathBuf>,
    /// File holding a bearer token sent with every request.
    pub token_file: Option<PathBuf>,
    /// PEM file of a CA that may sign a `grpc+https` peer's certificate
    /// (besides the system's roots).
    pub ca_file: Option<PathBuf>,
    /// Bound on connecting (default 5 s).
    pub connect_timeout: Option<crate::composition::Duration>,
    /// Bound on the wait for the first answer of a Stat or Read (default
    /// 30 s).
    pub first_byte_timeout: Option<crate::composition::Duration>,
    /// Bound on the gap between two messages of a Read (default 30 s).
    pub idle_timeout: Option<crate::composition::Duration>,
    /// Bound on a whole Stat, and on a Read from opening it to its last
    /// byte (default: none).
    pub request_timeout: Option<crate::composition::Duration>,
    /// How many times a Stat, or a Read that has not delivered anything
    /// yet, is repeated after a connection failure (default 2; 0 disables).
    pub retries: Option<u32>,
    /// Delay before the first retry; it doubles (plus jitter) with each
    /// further one (default 50 ms).
    pub retry_backoff: Option<crate::composition::Duration>,
}

fn deserialize_peer_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<PeerAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

#[async_trait]
impl TierConfig for GrpcConfig {
    /// The peer, then the bounds and retries in effect (defaults filled
    /// in), so `strata check` shows how a hung or flaky peer is handled.
    fn describe(&self) -> String {
        let d = PeerOptions::default();
        let show = |set: Option<crate::composition::Duration>, default: Duration| {
            humantime::format_duration(set.map_or(default, |d| d.0)).to_string()
        };
        format!(
            "grpc (url = {}, protocol = {}, connect_timeout = {}, first_byte_timeout = {}, \
             idle_timeout = {}, request_timeout = {}, retries = {}, retry_backoff = {})",
            self.url,
            self.protocol,
            show(self.connect_timeout, d.connect_timeout),
            show(self.first_byte_timeout, d.first_byte_timeout),
            show(self.idle_timeout, d.idle_timeout),
            self.request_timeout.map_or("none".into(), |t| {
                humantime::format_duration(t.0).to_string()
            }),
            self.retries.unwrap_or(d.retries),
            show(self.retry_backoff, d.retry_backoff),
        )
    }

    fn remote(&self) -> bool {
        true
    }

    fn persistent(&self, _ctx: &BuildContext) -> bool {
        true
    }

    async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobService>> {
        let read = |what: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| {
                Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("{what} {}: {e}", path.display()),
                ))
            })
        };
        let token = match &self.token_file {
            Some(path) => Some(
                String::from_utf8_lossy(&read("token_file", path)?)
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let ca = match &self.ca_file {
            Some(path) => Some(read("ca_file", path)?),
            None => None,
        };
        let defaults = PeerOptions::default();
        let peer = PeerOptions {
            spool_dir: self.spool_dir.clone(),
            token,
            ca_pem: ca,
            connect_timeout: self
                .connect_timeout
                .map_or(defaults.connect_timeout, |d| d.0),
            first_byte_timeout: self
                .first_byte_timeout
                .map_or(defaults.first_byte_timeout, |d| d.0),
            idle_timeout: self.idle_timeout.map_or(defaults.idle_timeout, |d| d.0),
            request_timeout: self.request_timeout.map(|d| d.0),
            retries: self.retries.unwrap_or(defaults.retries),
            retry_backoff: self.retry_backoff.map_or(defaults.retry_backoff, |d| d.0),
            retry_counter: ctx.tier_metrics().retries,
        };
        Ok(Arc::new(GrpcBlobService::with_options(
            self.url.clone(),
            self.protocol,
            peer,
        )?))
    }
}

/// `grpc+http://…`, `grpc+https://…`, `grpc+unix:///…`: an anonymous peer
/// speaking the snix package.
pub fn from_url(url: &str) -> Result<Box<dyn TierConfig>, String> {
    Ok(Box::new(GrpcConfig {
        url: url
            .parse()
            .map_err(|e: crate::addr::AddrError| e.to_string())?,
        protocol: Protocol::Snix,
        spool_dir: None,
        token_file: None,
        ca_file: None,
        connect_timeout: None,
        first_byte_timeout: None,
        idle_timeout: None,
        request_timeout: None,
        retries: None,
        retry_backoff: None,
    }))
}

/// How to reach a peer beyond its address.
#[derive(Debug, Clone)]
pub struct PeerOptions {
    /// Where large blobs are spooled while verified.
    pub spool_dir: Option<PathBuf>,
    /// A bearer token sent with every request.
    pub token: Option<String>,
    /// A CA (PEM) that may sign a `grpc+https` peer's certificate.
    pub ca_pem: Option<Vec<u8>>,
    /// Bound on connecting.
    pub connect_timeout: Duration,
    /// Bound on the wait for the first answer of a Stat or Read.
    pub first_byte_timeout: Duration,
    /// Bound on the gap between two messages of a Read.
    pub idle_timeout: Duration,
    /// Bound on a whole Stat, and on a Read from opening to last byte.
    pub request_timeout: Option<Duration>,
    /// Repeats of a Stat or unanswered Read after a connection failure.
    pub retries: u32,
    /// Delay before the first retry.
    pub retry_backoff: Duration,
    /// Counts the retries.
    pub retry_counter: Counter,
}

/// Default number of retries after a connection failure.
pub const DEFAULT_RETRIES: u32 = 2;
/// Default delay before the first retry.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(50);
/// Longest delay between two retries, however many there are.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

impl Default for PeerOptions {
    /// Timeouts that let a slow peer finish but cut off a hung one: a
    /// Read's total time is not bounded unless `request_timeout` is set (a
    /// large blob takes as long as it takes), only its first answer and
    /// each gap; two retries after a connection failure.
    fn default() -> Self {
        PeerOptions {
            spool_dir: None,
            token: None,
            ca_pem: None,
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            request_timeout: None,
            retries: DEFAULT_RETRIES,
            retry_backoff: DEFAULT_RETRY_BACKOFF,
            retry_counter: Counter::default(),
        }
    }
}

/// A peer BlobService. See the module docs.
#[derive(Clone)]
pub struct GrpcBlobService {
    addr: PeerAddr,
    stats: StatClient,
    /// Reads, answered without tonic's copy of each message.
    reads: ReadClient,
    /// Puts, sent without tonic's copy of each message.
    puts: PutClient,
    spool_dir: Option<PathBuf>,
    first_byte_timeout: Duration,
    idle_timeout: Duration,
    request_timeout: Option<Duration>,
    /// When the request this copy of the service serves must be done (set
    /// on the copy a chunked Read fetches its chunks through).
    deadline: Option<Instant>,
    retries: u32,
    retry_backoff: Duration,
    retry_counter: Counter,
    /// Small blobs that came with a Stat, for the read that follows.
    inlined: Inlined,
}

impl GrpcBlobService {
    /// A service for the peer at `addr` (connected lazily).
    pub fn new(addr: PeerAddr, protocol: Protocol, spool_dir: Option<PathBuf>) -> Result<Self> {
        let options = PeerOptions {
            spool_dir,
            ..Default::default()
        };
        GrpcBlobService::with_options(addr, protocol, options)
    }

    /// A service for the peer at `addr` (connected lazily), with a token or
    /// a private CA.
    pub fn with_options(addr: PeerAddr, protocol: Protocol, options: PeerOptions) -> Result<Self> {
        let connect_error = |message: String| Error::Connect {
            peer: addr.to_string(),
            message,
        };
        let channel = addr
            .channel_with_ca(options.connect_timeout, options.ca_pem.as_deref())
            .map_err(|e| connect_error(e.to_string()))?;
        let auth =
            BearerToken::new(options.token.as_deref()).map_err(|e| connect_error(e.to_string()))?;
        let channel = InterceptedService::new(channel, auth);
        let service_name = match protocol {
            Protocol::Snix => snix::blob_service_server::SERVICE_NAME,
            Protocol::Tvix => tvix::blob_service_server::SERVICE_NAME,
        };
        let reads = ReadClient::new(channel.clone(), service_name, DEFAULT_MAX_MESSAGE_SIZE * 2);
        let puts = PutClient::new(channel.clone(), service_name);
        let stats = StatClient::new(channel, service_name, DEFAULT_MAX_MESSAGE_SIZE * 2);
        let spool_dir = options.spool_dir;
        Ok(GrpcBlobService {
            addr,
            stats,
            reads,
            puts,
            spool_dir,
            first_byte_timeout: options.first_byte_timeout,
            idle_timeout: options.idle_timeout,
            request_timeout: options.request_timeout,
            deadline: None,
            retries: options.retries,
            retry_backoff: options.retry_backoff,
            retry_counter: options.retry_counter,
            inlined: Inlined::default(),
        })
    }

    /// When a request starting now must be done: the deadline of the Read
    /// this copy serves, else `request_timeout` from now.
    fn request_deadline(&self) -> Option<Instant> {
        self.deadline
            .or_else(|| self.request_timeout.map(|t| Instant::now() + t))
    }

    /// `call` cut off at `deadline`, if there is one.
    async fn by_deadline<T>(
        &self,
        deadline: Option<Instant>,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let Some(deadline) = deadline else {
            return call.await;
        };
        let after = self.request_timeout.unwrap_or_default();
        tokio::time::timeout_at(deadline, call)
            .await
            .unwrap_or_else(|_| Err(self.timed_out(after)))
    }

    /// The payload of a Read of the whole blob `digest`, `None` if the peer
    /// does not have it. Opening is retried after connection failures; the
    /// Read, from its opening to its last message, is bounded by `deadline`
    /// and each gap between messages by `idle_timeout`.
    async fn read_payload(
        &self,
        digest: &B3Digest,
        deadline: Option<Instant>,
    ) -> Result<Option<BoxStream<'static, Result<Bytes>>>> {
        let opened = self.by_deadline(
            deadline,
            self.retrying("read", digest, || self.open_stream(digest)),
        );
        Ok(opened
            .await?
            .map(|stream| self.clone().payload(stream, deadline)))
    }

    /// The payload of a Read answer, each gap between messages bounded by
    /// `idle_timeout` and the whole by `deadline`; an error ends it.
    fn payload(
        self,
        mut stream: Peekable<Payload>,
        deadline: Option<Instant>,
    ) -> BoxStream<'static, Result<Bytes>> {
        Box::pin(async_stream::stream! {
            loop {
                let gap = Instant::now() + self.idle_timeout;
                let (until, after) = match deadline {
                    Some(d) if d < gap => (d, self.request_timeout.unwrap_or_default()),
                    _ => (gap, self.idle_timeout),
                };
                match tokio::time::timeout_at(until, stream.next()).await {
                    Ok(Some(Ok(data))) => yield Ok(data),
                    Ok(Some(Err(status))) => {
                        yield Err(self.peer_error(status));
                        break;
                    }
                    Ok(None) => break,
                    Err(_) => {
                        yield Err(self.timed_out(after));
                        break;
                    }
                }
            }
        })
    }

    /// Runs `call` and repeats it, after a backoff, while it fails for a
    /// connection failure and retries are left. Only for calls that are
    /// safe to repeat: nothing of their answer has been used yet.
    ///
    /// `backon` supplies the schedule (exponential, capped, with jitter so
    /// that sidecars that lost the same peer do not come back in step).
    async fn retrying<T, F, Fut>(&self, op: &'static str, digest: &B3Digest, call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let schedule = ExponentialBuilder::new()
            .with_min_delay(self.retry_backoff)
            .with_max_delay(MAX_RETRY_DELAY.max(self.retry_backoff))
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(self.retries as usize);
        let mut attempt = 0u32;
        call.retry(schedule)
            .sleep(tokio::time::sleep)
            .when(is_connection_failure)
            .notify(|e: &Error, delay: Duration| {
                attempt += 1;
                self.retry_counter.inc();
                debug!(peer = %self.addr, op, %digest, attempt, ?delay, error = %e,
                    "connection to the peer failed; retrying");
            })
            .await
    }

    fn timed_out(&self, after: Duration) -> Error {
        Error::Timeout {
            tier: self.addr.to_string(),
            after,
        }
    }

    /// `call` bounded by the first-byte timeout.
    async fn first_answer<T>(&self, call: impl Future<Output = T>) -> Result<T> {
        tokio::time::timeout(self.first_byte_timeout, call)
            .await
            .map_err(|_| self.timed_out(self.first_byte_timeout))
    }

    fn peer_error(&self, status: tonic::Status) -> Error {
        Error::Peer {
            peer: self.addr.to_string(),
            status: Box::new(status),
        }
    }

    /// The peer's Stat, checked for internal consistency; with `send_bao`,
    /// also its outboard (checked against the digest). A blob of up to
    /// `inline_max` bytes may come with it, unchecked.
    async fn stat_raw(
        &self,
        digest: &B3Digest,
        send_bao: bool,
        inline_max: u64,
    ) -> Result<Option<PeerStat>> {
        if digest.is_empty_blob() {
            return Ok(Some(PeerStat {
                size: Some(0),
                chunks: Vec::new(),
                outboard: None,
                inline: Bytes::new(),
            }));
        }
        let req = StatBlobRequest {
            digest: (*digest).into(),
            send_chunks: true,
            send_bao,
            bao_shift: if send_bao { STORED_SHIFT.into() } else { 0 },
            inline_max_size: inline_max,
        };
        let answer = self
            .retrying("stat", digest, || async {
                match self.first_answer(self.stats.stat(&req)).await? {
                    Ok(resp) => Ok(Some(resp)),
                    Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
                    Err(status) => Err(self.peer_error(status)),
                }
            })
            .await?;
        let Some(resp): Option<StatBlobResponse> = answer else {
            return Ok(None);
        };
        let chunks = resp
            .chunks
            .iter()
            .map(|c| {
                Ok(ChunkMeta {
                    digest: B3Digest::try_from(&c.digest)?,
                    size: c.size,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let chunk_sum = match listed_len(&chunks) {
            _ if chunks.is_empty() => None,
            Some(sum) => Some(sum),
            None => return Err(VerifyError::BadChunkList { blob: *digest }.into()),
        };
        let size = match (resp.size, chunk_sum) {
            (0, sum) => sum,
            (size, Some(sum)) if size != sum => {
                return Err(VerifyError::LengthMismatch {
                    what: "blob",
                    expected: *digest,
                    expected_len: size,
                    actual_len: sum,
                }
                .into());
            }
            (size, _) => Some(size),
        };
        let outboard = self.check_outboard(digest, size, resp.bao_shift, resp.bao)?;
        Ok(Some(PeerStat {
            size,
            chunks,
            outboard,
            inline: resp.inline_data,
        }))
    }

    /// The peer's Stat, asking for a blob of up to `inline_max` bytes
    /// inline. A blob that came inline is checked and kept in [`Inlined`]
    /// for the read that follows: whole if it is one piece, else by its
    /// listed chunks. Bytes that do not match are the peer lying (an
    /// error).
    async fn stat_inlining(&self, digest: &B3Digest, inline_max: u64) -> Result<Option<BlobStat>> {
        self.by_deadline(self.request_deadline(), async {
            let Some(stat) = self.stat_raw(digest, false, inline_max).await? else {
                return Ok(None);
            };
            // Only what was asked for.
            let mut size = stat.size;
            let asked = (1..=inline_max).contains(&(stat.inline.len() as u64));
            if asked {
                let len = stat.inline.len() as u64;
                let kept = if stat.chunks.len() < 2 {
                    self.inlined.check_and_keep(digest, size, stat.inline)
                } else {
                    self.inlined
                        .check_and_keep_chunks(digest, &stat.chunks, stat.inline)
                };
                if let Err(e) = kept {
                    warn!(peer = %self.addr, %digest, error = %e, "peer sent bad inline data");
                    return Err(e.into());
                }
                size = Some(len);
            }
            let size = match size {
                Some(size) => size,
                // A stock peer that keeps the blob in one piece says
                // nothing about its size; the only trustworthy way to learn
                // it is a verified read.
                None => match self.fetch_verified(digest, None, None).await? {
                    Some(reader) => reader.len(),
                    None => return Ok(None),
                },
            };
            Ok(Some(BlobStat {
                size,
                chunks: stat.chunks,
            }))
        })
        .await
    }

    /// Checks the outboard a peer sent against the digest. A wrong one is
    /// the peer lying (an error); an empty one, or one too coarse to stream
    /// with, is no outboard.
    fn check_outboard(
        &self,
        digest: &B3Digest,
        size: Option<u64>,
        shift: u32,
        bao: Bytes,
    ) -> Result<Option<Outboard>> {
        let Some(size) = size else {
            return Ok(None);
        };
        let shift = u8::try_from(shift).unwrap_or(u8::MAX);
        if shift > MAX_VERIFY_SHIFT
            || (bao.is_empty() && size > crate::verify::bao::group_len(shift))
        {
            return Ok(None);
        }
        match Outboard::verify(*digest, size, shift, bao) {
            Ok(outboard) => Ok(Some(outboard)),
            Err(e) => {
                warn!(peer = %self.addr, %digest, error = %e, "peer sent a bad outboard");
                Err(e.into())
            }
        }
    }

    /// Sends a Read and waits for the first message of the answer, which
    /// stays in the stream; `None` if the peer does not have the blob. A
    /// connection failure up to here is an error (and nothing was consumed,
    /// so the caller may try again).
    async fn open_stream(&self, digest: &B3Digest) -> Result<Option<Peekable<Payload>>> {
        let req = ReadBlobRequest {
            digest: (*digest).into(),
        };
        let stream = match self.first_answer(self.reads.read(req)).await? {
            Ok(payload) => payload,
            Err(status) if status.code() == tonic::Code::NotFound => return Ok(None),
            Err(status) => return Err(self.peer_error(status)),
        };
        // The status may also come as the first item of the stream.
        let mut stream = stream.peekable();
        let first = self
            .first_answer(std::pin::Pin::new(&mut stream).peek())
            .await?;
        let (absent, broken) = match first {
            Some(Err(status)) => (
                status.code() == tonic::Code::NotFound,
                status_is_connection_failure(status),
            ),
            _ => (false, false),
        };
        if absent {
            return Ok(None);
        }
        if broken {
            // Take the status out of the stream, to report it.
            if let Some(Err(status)) = stream.next().await {
                return Err(self.peer_error(status));
            }
        }
        Ok(Some(stream))
    }

    /// Reads the whole blob from the peer and verifies it before returning a
    /// reader over it. `expected_len` is the size the peer announced, if any.
    #[instrument(skip(self), fields(peer = %self.addr))]
    async fn fetch_verified(
        &self,
        digest: &B3Digest,
        expected_len: Option<u64>,
        outboard: Option<Outboard>,
    ) -> Result<Option<Box<dyn BlobReader>>> {
        let Some(mut stream) = self
            .retrying("read", digest, || self.open_stream(digest))
            .await?
        else {
            return Ok(None);
        };
        let idle = self.idle_timeout;
        let pieces = Box::pin(async_stream::stream! {
            loop {
                match tokio::time::timeout(idle, stream.next()).await {
                    Ok(Some(piece)) => yield piece.map_err(|s| self.peer_error(s)),
                    Ok(None) => break,
                    Err(_) => {
                        yield Err(self.timed_out(idle));
                        break;
                    }
                }
            }
        });
        let spool_dir = self.spool_dir.clone();
        match spool_verified(*digest, expected_len, outboard, spool_dir, pieces).await {
            Ok(reader) => Ok(Some(reader)),
            Err(e @ Error::Verification(_)) => {
                warn!(peer = %self.addr, %digest, error = %e, "peer sent bad data");
                Err(e)
            }
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl BlobService for GrpcBlobService {
    #[instrument(skip(self), fields(peer = %self.addr, %digest), err)]
    async fn stat(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
        self.stat_inlining(digest, 0).await
    }

    /// Asks for a blob of up to `INLINE_MAX` (512 KiB) bytes inline, and
    /// keeps it (checked) for the read that follows.
    #[instrument(skip(self), fields(peer = %self.addr, %digest), err)]
    async fn stat_before_read(&self, digest: &B3Digest) -> Result<Option<BlobStat>> {
        self.stat_inlining(digest, INLINE_MAX).await
    }

    /// Asks the peer for the outboard at the shift strata stores (or the
    /// coarser one it can fit in a message). A wrong outboard is an error.
    #[instrument(skip(self), fields(peer = %self.addr, %digest), err)]
    async fn outboard(&self, digest: &B3Digest) -> Result<Option<Outboard>> {
        let stat = self
            .by_deadline(self.request_deadline(), self.stat_raw(digest, true, 0))
            .await?;
        Ok(stat.and_then(|stat| stat.outboard))
    }

    #[instrument(skip(self), fields(peer = %self.addr, %digest), err)]
    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>> {
        let deadline = self.request_deadline();
        if let Some(data) = self.inlined.take(digest) {
            return Ok(Some(Box::new(BufferedReader::new(data)) as _));
        }
        self.by_deadline(deadline, async {
            let Some(stat) = self.stat_raw(digest, true, 0).await? else {
                return Ok(None);
            };
            if stat.size == Some(0) && digest.is_empty_blob() {
                return Ok(Some(Box::new(BufferedReader::new(Bytes::new())) as _));
            }
            if stat.chunks.len() >= 2
                && let Some(outboard) = stat.outboard
            {
                // Read from the start, the blob comes in one Read, checked
                // group by group; after a seek, the chunks the position
                // needs are fetched as the reader goes. Either way within
                // what is left of this Read's time.
                let fetcher = GrpcBlobService {
                    deadline,
                    ..self.clone()
                };
                let chunked = ChunkedReader::new(
                    *digest,
                    stat.chunks,
                    Arc::new(ServiceChunks(Arc::new(fetcher.clone()))),
                    READ_AHEAD,
                    Some(outboard.clone()),
                );
                let blob = *digest;
                let open: OpenStream = Box::new(move || {
                    Box::pin(async move {
                        match fetcher.read_payload(&blob, deadline).await? {
                            Some(pieces) => Ok(pieces),
                            None => {
                                let gone = format!("blob {blob} is gone since its Stat");
                                Err(fetcher.peer_error(tonic::Status::not_found(gone)))
                            }
                        }
                    })
                });
                return Ok(Some(
                    Box::new(StreamedReader::new(outboard, open, chunked)) as _
                ));
            }
            self.fetch_verified(digest, stat.size, stat.outboard).await
        })
        .await
    }

    /// Skips the Stat: the length is known, so the Read goes out at once.
    #[instrument(skip(self), fields(peer = %self.addr, digest = %chunk.digest), err)]
    ///
    /// A chunk is small and its length known, so it is gathered straight
    /// from the answer's payload pieces (one copy at most, none when it
    /// came in one piece) and hashed once, rather than spooled and read
    /// back.
    async fn read_chunk(&self, chunk: &ChunkMeta) -> Result<Option<Bytes>> {
        // The pieces are gathered up to the listed size: bound it first.
        check_chunk_size(chunk)?;
        // Checked against the digest when kept, and a digest has one length.
        if let Some(data) = self
            .inlined
            .take(&chunk.digest)
            .filter(|data| data.len() as u64 == chunk.size)
        {
            return Ok(Some(data));
        }
        self.by_deadline(self.request_deadline(), async {
            let digest = &chunk.digest;
            let Some(mut stream) = self
                .retrying("read", digest, || self.open_stream(digest))
                .await?
            else {
                return Ok(None);
            };
            let overrun = |got: u64| {
                Error::from(VerifyError::LengthMismatch {
                    what: "chunk",
                    expected: *digest,
                    expected_len: chunk.size,
                    actual_len: got,
                })
            };
            let idle = self.idle_timeout;
            let mut pieces = Vec::new();
            let mut got = 0u64;
            loop {
                let msg = match tokio::time::timeout(idle, stream.next()).await {
                    Ok(Some(piece)) => piece.map_err(|s| self.peer_error(s))?,
                    Ok(None) => break,
                    Err(_) => return Err(self.timed_out(idle)),
                };
                got += msg.len() as u64;
                if got > chunk.size {
                    return Err(overrun(got));
                }
                pieces.push(msg);
            }
            let data = if pieces.len() == 1 {
                pieces.swap_remove(0)
            } else {
                let mut whole = BytesMut::with_capacity(got as usize);
                for piece in &pieces {
                    whole.extend_from_slice(piece);
                }
                whole.freeze()
            };
            if let Err(e) = verify_chunk_meta(chunk, &data) {
                warn!(peer = %self.addr, %digest, error = %e, "peer sent bad data");
                return Err(e.into());
            }
            Ok(Some(data))
        })
        .await
    }

    /// One Read of the whole blob, cut along the list ([`cut_chunks`]): a
    /// round trip for the blob instead of one per chunk, and one stream for
    /// the peer to serve. Bounded like a Read: the first answer, each gap
    /// between messages, and the request's deadline.
    #[instrument(skip(self, chunks), fields(peer = %self.addr, %digest, chunks = chunks.len()), err)]
    async fn stream_chunks(
        &self,
        digest: &B3Digest,
        chunks: &[ChunkMeta],
    ) -> Result<Option<ChunkStream>> {
        // Chunks that came inline with the Stat before this read were
        // each checked as they were kept.
        if let Some(kept) = self.inlined.take_all(chunks) {
            return Ok(Some(
                futures::stream::iter(kept.into_iter().map(Ok)).boxed(),
            ));
        }
        let deadline = self.request_deadline();
        let pieces = self.read_payload(digest, deadline).await?;
        Ok(pieces.map(|pieces| cut_chunks(*digest, chunks.to_vec(), pieces)))
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>> {
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        let puts = self.puts.clone();
        let task = tokio::spawn(async move { puts.put(ReceiverStream::new(rx)).await });
        Ok(Box::new(GrpcWriter {
            peer: self.addr.to_string(),
            tx: Some(tx),
            task,
            hasher: blake3::Hasher::new(),
            size: 0,
            closed: false,
        }))
    }
}

/// An upload to a peer. The digest the peer reports is checked against a
/// local hash of what was sent.
struct GrpcWriter {
    peer: String,
    tx: Option<mpsc::Sender<Bytes>>,
    task: JoinHandle<Result<PutBlobResponse, tonic::Status>>,
    hasher: blake3::Hasher,
    size: u64,
    closed: bool,
}

impl GrpcWriter {
    async fn rpc_result(&mut self) -> Result<PutBlobResponse> {
        let peer = self.peer.clone();
        match (&mut self.task).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(status)) => Err(Error::Peer {
                peer,
                status: Box::new(status),
            }),
            Err(join) => Err(Error::Peer {
                peer,
                status: Box::new(tonic::Status::internal(format!(
                    "upload task failed: {join}"
                ))),
            }),
        }
    }
}

#[async_trait]
impl BlobWriter for GrpcWriter {
    async fn write(&mut self, mut data: Bytes) -> Result<()> {
        self.hasher.update(&data);
        self.size += data.len() as u64;
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(PUT_MESSAGE_SIZE));
            let Some(tx) = &self.tx else {
                return Err(Error::InvalidRequest("write after close".into()));
            };
            if tx.send(piece).await.is_err() {
                // The RPC ended early; its result says why.
                self.tx = None;
                self.rpc_result().await?;
                return Err(Error::Peer {
                    peer: self.peer.clone(),
                    status: Box::new(tonic::Status::aborted("peer ended the upload early")),
                });
            }
        }
        Ok(())
    }

    async fn close(mut self: Box<Self>) -> Result<PutResult> {
        self.tx = None;
        self.closed = true;
        let resp = self.rpc_result().await?;
        let digest = B3Digest::from(self.hasher.finalize());
        let reported = B3Digest::try_from(&resp.digest)?;
        if reported != digest {
            return Err(VerifyError::DigestMismatch {
                what: "blob",
                expected: digest,
                actual: reported,
            }
            .into());
        }
        Ok(PutResult {
            digest,
            size: self.size,
            chunks: Vec::new(),
        })
    }
}

impl Drop for GrpcWriter {
    fn drop(&mut self) {
        // Ending the request stream would commit a partial blob on the
        // peer; cancelling the call resets the stream instead.
        if !self.closed {
            self.task.abort();
        }
    }
}

/// Whether `err` is a connection failure: the peer was not reached, or the
/// connection broke before it answered. See [`status_is_connection_failure`].
fn is_connection_failure(err: &Error) -> bool {
    match err {
        Error::Peer { status, .. } => status_is_connection_failure(status),
        _ => false,
    }
}

/// Whether a status reports a broken or refused connection rather than an
/// answer: it was made on this side from a transport error (it carries
/// that error as its source; a status the peer sent has none); it is
/// UNAVAILABLE, or comes from an I/O error that means the connection is
/// gone, or from hyper giving up on the request because its connection
/// closed (before it was sent, or before the answer was complete); and it
/// is not a timeout (a slow peer is not helped by asking again).
fn status_is_connection_failure(status: &tonic::Status) -> bool {
    use std::error::Error as _;
    use std::io::ErrorKind;
    let Some(source) = status.source() else {
        return false;
    };
    let mut broken_io = false;
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(source);
    while let Some(e) = next {
        if e.is::<tonic::TimeoutExpired>() {
            return false;
        }
        if let Some(hyper) = e.downcast_ref::<hyper::Error>() {
            if hyper.is_timeout() {
                return false;
            }
            if hyper.is_canceled() || hyper.is_closed() || hyper.is_incomplete_message() {
                broken_io = true;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.kind() {
                ErrorKind::TimedOut => return false,
                ErrorKind::ConnectionRefused
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
                | ErrorKind::NotConnected
                | ErrorKind::UnexpectedEof => broken_io = true,
                _ => {}
            }
        }
        next = e.source();
    }
    status.code() == tonic::Code::Unavailable || broken_io
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunkstore::ChunkedBlobService;
    use crate::kinds::memory::MemoryStore;
    use crate::proto::snix::BlobChunk;
    use crate::server::{BlobServer, ServeOptions};

    #[test]
    fn describe_shows_the_bounds_in_effect() {
        let config: GrpcConfig = toml::from_str(
            "url = \"grpc+http://127.0.0.1:9\"\nrequest_timeout = \"2m\"\nretries = 0\n",
        )
        .unwrap();
        let shown = config.describe();
        for part in [
            "connect_timeout = 5s",
            "first_byte_timeout = 30s",
            "request_timeout = 2m",
            "retries = 0",
            "retry_backoff = 50ms",
        ] {
            assert!(shown.contains(part), "{part} missing from {shown}");
        }
    }

    /// A strata server over a memory store holding `data`, on loopback.
    async fn origin(data: &[u8]) -> (std::net::SocketAddr, B3Digest) {
        let store: Arc<dyn BlobService> =
            Arc::new(ChunkedBlobService::new(MemoryStore::new(64 << 20)));
        let mut w = store.open_write().await.unwrap();
        w.write(Bytes::copy_from_slice(data)).await.unwrap();
        let digest = w.close().await.unwrap().digest;
        let server = BlobServer::new(store, &ServeOptions::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(snix::blob_service_server::BlobServiceServer::new(server))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (addr, digest)
    }

    fn peer(addr: std::net::SocketAddr, retries: u32, counter: &Counter) -> GrpcBlobService {
        let options = PeerOptions {
            retries,
            retry_backoff: Duration::from_millis(10),
            retry_counter: counter.clone(),
            ..Default::default()
        };
        GrpcBlobService::with_options(
            format!("grpc+http://{addr}").parse().unwrap(),
            Protocol::Snix,
            options,
        )
        .unwrap()
    }

    /// A Read (here of a whole chunk, which goes straight to the Read RPC)
    /// is repeated after connections that were reset before any answer,
    /// and only as often as configured.
    #[tokio::test]
    async fn a_read_is_retried_after_reset_connections() {
        let data = crate::testkit::pseudo_random(100_000, 7);
        let (origin, digest) = origin(&data).await;
        let chunk = ChunkMeta {
            digest,
            size: data.len() as u64,
        };

        let (proxy, accepted) = crate::testkit::resetting_proxy(origin, 2).await.unwrap();
        let retries = Counter::default();
        let got = peer(proxy, 2, &retries).read_chunk(&chunk).await.unwrap();
        assert_eq!(got.as_deref(), Some(&data[..]));
        assert_eq!(retries.get(), 2);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);

        let (proxy, _) = crate::testkit::resetting_proxy(origin, 2).await.unwrap();
        let retries = Counter::default();
        let err = peer(proxy, 1, &retries)
            .read_chunk(&chunk)
            .await
            .unwrap_err();
        assert!(is_connection_failure(&err), "{err}");
        assert_eq!(retries.get(), 1);

        let (proxy, _) = crate::testkit::resetting_proxy(origin, 1).await.unwrap();
        let retries = Counter::default();
        assert!(peer(proxy, 0, &retries).read_chunk(&chunk).await.is_err());
        assert_eq!(retries.get(), 0);
    }

    /// Answers are not retried: NOT_FOUND is an answer, and so is an
    /// error status the peer sent.
    #[tokio::test]
    async fn answers_are_not_retried() {
        let (origin, _) = origin(b"x").await;
        let retries = Counter::default();
        let svc = peer(origin, 3, &retries);
        let absent = B3Digest::of(b"absent");
        assert!(svc.stat(&absent).await.unwrap().is_none());
        assert!(
            svc.read_chunk(&ChunkMeta {
                digest: absent,
                size: 6
            })
            .await
            .unwrap()
            .is_none()
        );
        assert_eq!(retries.get(), 0);
        let sent = tonic::Status::unavailable("the peer's own tiers are down");
        assert!(!status_is_connection_failure(&sent));
    }

    /// A peer whose Stat brings `data` inline (whatever was asked), and
    /// which counts the Reads it refuses.
    struct InlinePeer {
        data: Bytes,
        reads: Counter,
    }

    #[tonic::async_trait]
    impl snix::blob_service_server::BlobService for InlinePeer {
        async fn stat(
            &self,
            _: tonic::Request<StatBlobRequest>,
        ) -> std::result::Result<tonic::Response<StatBlobResponse>, tonic::Status> {
            Ok(tonic::Response::new(StatBlobResponse {
                size: self.data.len() as u64,
                inline_data: self.data.clone(),
                ..Default::default()
            }))
        }

        type ReadStream = BoxStream<'static, std::result::Result<BlobChunk, tonic::Status>>;

        async fn read(
            &self,
            _: tonic::Request<ReadBlobRequest>,
        ) -> std::result::Result<tonic::Response<Self::ReadStream>, tonic::Status> {
            self.reads.inc();
            Err(tonic::Status::unimplemented("no Reads here"))
        }

        async fn put(
            &self,
            _: tonic::Request<tonic::Streaming<BlobChunk>>,
        ) -> std::result::Result<tonic::Response<PutBlobResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("no Puts here"))
        }
    }

    async fn inline_peer(data: &'static [u8], reads: &Counter) -> GrpcBlobService {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fake = InlinePeer {
            data: Bytes::from_static(data),
            reads: reads.clone(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(snix::blob_service_server::BlobServiceServer::new(fake))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        peer(addr, 0, &Counter::default())
    }

    /// A blob that came with the Stat before a read is that read's answer,
    /// once; bytes that are not the blob asked for are the peer lying.
    #[tokio::test]
    async fn a_stat_before_a_read_brings_the_blob_for_it() {
        let data: &'static [u8] = b"a small blob, inline";
        let digest = B3Digest::of(data);
        let reads = Counter::default();
        let svc = inline_peer(data, &reads).await;

        let stat = svc.stat_before_read(&digest).await.unwrap().unwrap();
        assert_eq!(stat.size, data.len() as u64);
        let chunk = ChunkMeta {
            digest,
            size: stat.size,
        };
        assert_eq!(svc.read_chunk(&chunk).await.unwrap().as_deref(), Some(data));
        svc.stat_before_read(&digest).await.unwrap();
        let mut reader = svc.open_read(&digest).await.unwrap().unwrap();
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut got)
            .await
            .unwrap();
        assert_eq!(got, data);
        assert_eq!(reads.get(), 0, "a Read went out");
        // Taken once: the next read asks the peer.
        assert!(svc.read_chunk(&chunk).await.is_err());
        assert_eq!(reads.get(), 1);

        // A plain Stat does not ask for the blob, nor keep it.
        svc.stat(&digest).await.unwrap();
        assert!(svc.inlined.take(&digest).is_none());

        let other = B3Digest::of(b"another blob");
        let err = svc.stat_before_read(&other).await.unwrap_err();
        assert!(matches!(err.root(), Error::Verification(_)), "{err}");
        assert!(svc.inlined.take(&other).is_none());
    }

    /// `request_timeout` bounds a Stat even when the peer accepts the
    /// connection and never answers, well before `first_byte_timeout`.
    #[tokio::test]
    async fn request_timeout_bounds_a_stat() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let options = PeerOptions {
            request_timeout: Some(Duration::from_millis(200)),
            first_byte_timeout: Duration::from_secs(60),
            ..Default::default()
        };
        let svc = GrpcBlobService::with_options(
            format!("grpc+http://{addr}").parse().unwrap(),
            Protocol::Snix,
            options,
        )
        .unwrap();
        let started = std::time::Instant::now();
        let err = svc.stat(&B3Digest::of(b"x")).await.unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(30));
    }
}
