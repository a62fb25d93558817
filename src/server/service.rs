//! The BlobService gRPC handlers, shared by the snix and tvix package names.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::field::Empty;
use tracing::{Instrument, Span, debug, info_span, warn};

use prost::Message;

use super::ServeOptions;
use super::limits::{Client, Limits, Slot};
use crate::blobservice::{BlobReader, BlobService, BlobStat, Pieces, read_to_bytes};
use crate::chunkstore::MAX_CHUNK_SIZE;
use crate::digest::{B3Digest, DIGEST_LEN};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::proto::snix::{
    BlobChunk, PutBlobResponse, ReadBlobRequest, StatBlobRequest, StatBlobResponse,
    stat_blob_response,
};
use crate::proto::{snix, tvix};
use crate::verify::{Outboard, OutboardHasher, bao};

/// Largest message of a Read response: a whole chunk, so a blob read
/// from a chunk store goes out one chunk per message, each a slice of the
/// verified chunk rather than a copy ([`BlobReader::poll_piece`]).
const READ_PIECE: usize = MAX_CHUNK_SIZE as usize;

/// Room for a `BlobChunk`'s field tag and length prefix in a message.
const MESSAGE_OVERHEAD: usize = 16;

/// Largest blob whose outboard Stat computes from the data when none is
/// stored.
pub const COMPUTE_LIMIT: u64 = 16 * 1024 * 1024;

/// Room left in a Stat response for its framing and small fields, beside
/// the chunk list and the outboard.
const STAT_HEADROOM: usize = 4096;

/// Serves a [`BlobService`] over gRPC.
#[derive(Clone)]
pub struct BlobServer {
    service: Arc<dyn BlobService>,
    max_inline_size: u64,
    max_message_size: usize,
    read_only: bool,
    max_put_size: Option<u64>,
    metrics: Metrics,
    limits: Limits,
    /// BLAKE3 of the `authorization` value requests must carry, if any.
    expected_auth: Option<blake3::Hash>,
}

impl BlobServer {
    /// Serves `service` as `opts` say: Stat never inlines blobs larger than
    /// `max_inline_size` nor sends a response larger than
    /// `max_message_size`; `read_only` refuses every Put.
    pub fn new(service: Arc<dyn BlobService>, opts: &ServeOptions) -> Self {
        BlobServer {
            service,
            max_inline_size: opts.max_inline_size,
            max_message_size: opts.max_message_size,
            read_only: opts.read_only,
            max_put_size: opts.max_put_size,
            metrics: opts.metrics.clone(),
            limits: Limits::new(opts.max_concurrent_requests, opts.max_concurrent_per_client),
            expected_auth: opts
                .token
                .as_ref()
                .map(|t| blake3::hash(format!("Bearer {t}").as_bytes())),
        }
    }

    /// Checks the bearer token, if the server requires one
    /// (`UNAUTHENTICATED`), then takes a slot within the concurrency limits
    /// (`RESOURCE_EXHAUSTED`); a refusal is counted as the RPC's outcome.
    fn admit<T>(&self, request: &Request<T>, rpc: &mut RpcGuard) -> Result<Slot, Status> {
        if let Some(expected) = &self.expected_auth {
            let given = request
                .metadata()
                .get("authorization")
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            // Compared as BLAKE3 hashes: `blake3::Hash` equality runs in
            // constant time, so timing does not leak the token.
            if blake3::hash(given) != *expected {
                rpc.record(tonic::Code::Unauthenticated);
                return Err(Status::unauthenticated(
                    "missing or wrong bearer token (authorization: Bearer …)",
                ));
            }
        }
        self.limits
            .admit(Client::of(request))
            .inspect_err(|status| {
                warn!(method = rpc.method, error = %status.message(), "request refused");
                rpc.refused();
            })
    }

    /// A reader over the blob, or NOT_FOUND.
    async fn open(&self, digest: &B3Digest) -> Result<Box<dyn BlobReader>, Status> {
        self.service
            .open_read(digest)
            .await
            .map_err(to_status)?
            .ok_or_else(|| not_found(digest))
    }

    async fn do_stat(&self, req: StatBlobRequest) -> Result<StatBlobResponse, Status> {
        let digest = parse_digest(&req.digest)?;
        let stat = self
            .service
            .stat(&digest)
            .await
            .map_err(to_status)?
            .ok_or_else(|| not_found(&digest))?;
        let mut resp = StatBlobResponse {
            size: stat.size,
            ..Default::default()
        };
        if req.send_chunks {
            resp.chunks = chunk_list(&stat.chunks);
            // The list of a blob of tens of GiB does not fit one message:
            // sent, it would fail the whole Stat (tonic refuses to encode
            // it), and a stock client reads nothing. Without it the answer
            // says "no finer chunking", and the client reads the blob whole.
            if resp.encoded_len() + STAT_HEADROOM > self.max_message_size {
                debug!(%digest, chunks = resp.chunks.len(), "chunk list too long for one message; left out");
                resp.chunks = Vec::new();
            }
        }
        let inline = stat.size <= req.inline_max_size.min(self.max_inline_size) && stat.size > 0;
        if req.send_bao {
            let taken =
                resp.encoded_len() + STAT_HEADROOM + if inline { stat.size as usize } else { 0 };
            let budget = self.max_message_size.saturating_sub(taken) as u64;
            if let Some(outboard) = self.outboard(&digest, &stat, req.bao_shift, budget).await? {
                resp.bao_shift = outboard.shift().into();
                resp.bao = outboard.data().clone();
            }
        }
        if inline {
            let mut reader = self.open(&digest).await?;
            resp.inline_data = read_to_bytes(reader.as_mut(), self.max_inline_size)
                .await
                .map_err(to_status)?;
        }
        Ok(resp)
    }

    /// The outboard Stat sends: at the shift asked for, or the finest
    /// coarser one that fits `budget` bytes. Derived from the stored
    /// outboard when that is as fine; else computed from the (verified)
    /// data, which reads the whole blob — unless the blob is larger than
    /// [`COMPUTE_LIMIT`]: then the stored outboard is sent as it is, at its
    /// coarser shift, or none if none is stored, rather than pulling a large
    /// blob through a Stat.
    async fn outboard(
        &self,
        digest: &B3Digest,
        stat: &BlobStat,
        requested: u32,
        budget: u64,
    ) -> Result<Option<Outboard>, Status> {
        let requested = u8::try_from(requested).unwrap_or(bao::MAX_SHIFT);
        let shift = bao::shift_within(stat.size, requested, budget);
        let stored = match self.service.outboard(digest).await {
            Ok(stored) => stored,
            Err(e) => {
                // Whoever failed to give one, the data can still make one.
                warn!(%digest, error = %e, "no stored outboard; computing one");
                None
            }
        };
        match stored {
            Some(stored) => match stored.coarsen(shift) {
                Some(outboard) => return Ok(Some(outboard)),
                // Stored coarser than asked (a fill kept the outboard its
                // source sent): the response names the shift it uses, and
                // that beats reading a large blob to compute a finer one.
                None if stat.size > COMPUTE_LIMIT => return Ok(Some(stored)),
                None => {}
            },
            None if stat.size > COMPUTE_LIMIT => return Ok(None),
            None => {}
        }
        let reader = self.open(digest).await?;
        let mut hasher = OutboardHasher::new(shift);
        let mut pieces = Pieces::new(reader, READ_PIECE);
        while let Some(piece) = pieces.next().await {
            hasher.update(&piece.map_err(|e| to_status(Error::from_io(e)))?);
        }
        let (computed, outboard) = hasher.finalize();
        if computed != *digest {
            // Readers are verified; this would be a bug, not a bad peer.
            return Err(Status::internal(format!(
                "blob {digest} read back as {computed}"
            )));
        }
        Ok(Some(outboard))
    }

    async fn do_read(&self, req: ReadBlobRequest) -> Result<PieceStream, Status> {
        let digest = parse_digest(&req.digest)?;
        let reader = self.open(&digest).await?;
        // A message carries its payload plus a few bytes of framing, and
        // must fit the configured cap.
        let piece = READ_PIECE.min(self.max_message_size.saturating_sub(MESSAGE_OVERHEAD));
        let stream = Pieces::new(reader, piece).map(move |piece| {
            piece.map_err(|e| {
                warn!(%digest, error = %e, "read failed mid-stream");
                to_status(Error::from_io(e))
            })
        });
        Ok(Box::pin(stream))
    }

    /// A Read of `package`'s BlobService, from admission to the end of its
    /// answer: the payload of each message, in order. It is counted, traced
    /// and holds its slot within the limits until its last piece is taken
    /// or it is dropped. Both the generated server and the zero-copy Read
    /// path ([`super::read_path`]) answer through this.
    pub(super) async fn read_pieces(
        &self,
        request: Request<ReadBlobRequest>,
        package: &'static str,
    ) -> Result<PieceStream, Status> {
        let mut rpc = RpcGuard::start(&self.metrics, "Read");
        let slot = self.admit(&request, &mut rpc)?;
        let req = request.into_inner();
        let span = info_span!("rpc", package, method = "Read",
            digest = %hex_or_raw(&req.digest), bytes = Empty, outcome = Empty);
        rpc.trace(&span);
        match self.do_read(req).instrument(span).await {
            Ok(stream) => Ok(rpc.until_end_of(stream, slot)),
            Err(status) => {
                rpc.finish::<()>(&Err(status.clone()));
                Err(status)
            }
        }
    }

    /// Largest message a Read request may be.
    pub(super) fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    /// A Put to `package`'s BlobService, from admission to the stored blob:
    /// `request` carries the payload of its messages, in order. Both the
    /// generated server and the zero-copy Put path ([`super::put_path`])
    /// store through this.
    pub(super) async fn put_pieces(
        &self,
        request: Request<PieceStream>,
        package: &'static str,
    ) -> Result<PutBlobResponse, Status> {
        let span = info_span!(
            "rpc",
            package,
            method = "Put",
            digest = Empty,
            bytes = Empty,
            outcome = Empty
        );
        let mut rpc = RpcGuard::start(&self.metrics, "Put");
        rpc.trace(&span);
        let _slot = self.admit(&request, &mut rpc)?;
        let answer = self
            .do_put(request.into_inner(), &rpc.bytes)
            .instrument(span)
            .await;
        rpc.finish(&answer);
        answer
    }

    /// Stores the blob the pieces carry; `received` counts its bytes.
    async fn do_put(
        &self,
        mut pieces: PieceStream,
        received: &AtomicU64,
    ) -> Result<PutBlobResponse, Status> {
        if self.read_only {
            return Err(Status::permission_denied("this server is read-only"));
        }
        let mut writer = self.service.open_write().await.map_err(to_status)?;
        while let Some(data) = pieces.next().await {
            let data = data?;
            let total =
                received.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64;
            if let Some(cap) = self.max_put_size
                && total > cap
            {
                // Dropping the writer abandons the blob.
                return Err(Status::resource_exhausted(format!(
                    "blob larger than this server's max_put_size ({cap} bytes)"
                )));
            }
            writer.write(data).await.map_err(to_status)?;
        }
        let result = writer.close().await.map_err(to_status)?;
        tracing::Span::current().record("digest", tracing::field::display(result.digest));
        Ok(PutBlobResponse {
            digest: result.digest.into(),
        })
    }
}

/// The stream type of Read responses.
pub type ReadStream = Pin<Box<dyn Stream<Item = Result<BlobChunk, Status>> + Send + 'static>>;

/// The payloads of a Read response's or Put request's messages, in order;
/// an error ends it.
pub(super) type PieceStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send + 'static>>;

fn parse_digest(raw: &[u8]) -> Result<B3Digest, Status> {
    B3Digest::try_from(raw).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// A Stat's chunk list in the wire type. The digests are slices of one
/// buffer: a GiB blob lists thousands of chunks, and a `Bytes` of its own
/// for each was an allocation and a free per chunk on every Stat.
fn chunk_list(chunks: &[crate::blobservice::ChunkMeta]) -> Vec<stat_blob_response::ChunkMeta> {
    let digests = Bytes::from(
        chunks
            .iter()
            .flat_map(|c| *c.digest.as_bytes())
            .collect::<Vec<u8>>(),
    );
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| stat_blob_response::ChunkMeta {
            digest: digests.slice(i * DIGEST_LEN..(i + 1) * DIGEST_LEN),
            size: c.size,
        })
        .collect()
}

fn not_found(digest: &B3Digest) -> Status {
    Status::not_found(format!("blob {digest} not found"))
}

/// Maps library errors to gRPC statuses.
pub fn to_status(err: Error) -> Status {
    match err.root() {
        Error::InvalidDigest(_) | Error::InvalidRequest(_) => {
            Status::invalid_argument(err.to_string())
        }
        Error::Verification(_) | Error::MissingChunk { .. } | Error::Corrupt(_) => {
            Status::data_loss(err.to_string())
        }
        Error::Backend(_)
        | Error::AllTiersFailed(_)
        | Error::Timeout { .. }
        | Error::CircuitOpen { .. } => Status::unavailable(err.to_string()),
        Error::Shared(_) | Error::Config(_) => Status::internal(err.to_string()),
        Error::ReadOnly(_) => Status::permission_denied(err.to_string()),
        Error::Peer { .. } | Error::Connect { .. } => Status::unavailable(err.to_string()),
        // gRPC's own definition of RESOURCE_EXHAUSTED names a full file
        // system; the client may retry later or elsewhere.
        Error::Io(e) if is_storage_full(e) => {
            Status::resource_exhausted(format!("disk full: {err}"))
        }
        Error::Io(_) => Status::internal(err.to_string()),
    }
}

/// Whether a write failed for lack of space (ENOSPC) or quota (EDQUOT).
fn is_storage_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// Implements one package's generated server trait by delegating to the
/// shared handlers, inside a span naming the package and the RPC.
macro_rules! impl_package {
    ($pkg:ident) => {
        #[tonic::async_trait]
        impl $pkg::blob_service_server::BlobService for BlobServer {
            async fn stat(
                &self,
                request: Request<StatBlobRequest>,
            ) -> Result<Response<StatBlobResponse>, Status> {
                let mut rpc = RpcGuard::start(&self.metrics, "Stat");
                let _slot = self.admit(&request, &mut rpc)?;
                let req = request.into_inner();
                let span = info_span!("rpc", package = stringify!($pkg), method = "Stat",
                    digest = %hex_or_raw(&req.digest), send_chunks = req.send_chunks,
                    outcome = Empty);
                rpc.trace(&span);
                let answer = self.do_stat(req).instrument(span).await;
                rpc.finish(&answer);
                answer.map(Response::new)
            }

            type ReadStream = ReadStream;

            /// Reached only where the server is built without
            /// `ZeroCopy` (`zero_copy.rs`); tonic copies each
            /// payload into its message here.
            async fn read(
                &self,
                request: Request<ReadBlobRequest>,
            ) -> Result<Response<Self::ReadStream>, Status> {
                let pieces = self.read_pieces(request, stringify!($pkg)).await?;
                let messages = pieces.map(|piece| piece.map(|data| BlobChunk { data }));
                Ok(Response::new(Box::pin(messages)))
            }

            /// Reached only where the server is built without
            /// `ZeroCopy` (`zero_copy.rs`); tonic's decoder gathers each
            /// message into a buffer of its own here.
            async fn put(
                &self,
                request: Request<Streaming<BlobChunk>>,
            ) -> Result<Response<PutBlobResponse>, Status> {
                let request = request.map(|messages| -> PieceStream {
                    Box::pin(messages.map(|message| message.map(|m| m.data)))
                });
                self.put_pieces(request, stringify!($pkg))
                    .await
                    .map(Response::new)
            }
        }
    };
}

impl_package!(snix);
impl_package!(tvix);

/// Counts one RPC: in flight while it lives, then done with a status code
/// and a duration. An RPC dropped before it finished (the client went away)
/// counts as `Cancelled`.
///
/// It also finishes the RPC's `rpc` span: records `bytes` (sent by a Read,
/// received by a Put) and `outcome` (the status code's name, as in the
/// metrics) and logs `request finished` in it at debug level. It holds the
/// span, so a Read's span closes when its stream ends or is dropped.
struct RpcGuard {
    metrics: Metrics,
    method: &'static str,
    started: Instant,
    done: bool,
    span: Span,
    /// Bytes sent (Read) or received (Put) so far; shared with the Put
    /// handler, so a Put the client abandons still reports them.
    bytes: AtomicU64,
}

impl RpcGuard {
    fn start(metrics: &Metrics, method: &'static str) -> Self {
        metrics.rpc_in_flight().inc();
        RpcGuard {
            metrics: metrics.clone(),
            method,
            started: Instant::now(),
            done: false,
            span: Span::none(),
            bytes: AtomicU64::new(0),
        }
    }

    /// The span the RPC runs in, finished with the RPC.
    fn trace(&mut self, span: &Span) {
        self.span = span.clone();
    }

    fn record(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self.metrics.rpc_in_flight().dec();
        let seconds = self.started.elapsed().as_secs_f64();
        self.metrics.rpc_done(self.method, code, seconds);
        self.span
            .record("bytes", self.bytes.load(Ordering::Relaxed));
        self.span.record("outcome", tracing::field::debug(code));
        debug!(parent: &self.span, seconds, "request finished");
    }

    /// Counts the RPC as refused by the limits.
    fn refused(&mut self) {
        self.record(tonic::Code::ResourceExhausted);
    }

    fn finish<T>(mut self, answer: &Result<T, Status>) {
        self.record(
            answer
                .as_ref()
                .map_or_else(Status::code, |_| tonic::Code::Ok),
        );
    }

    /// The Read stream, counted as done when its last message (or its
    /// error) has been taken; it holds `slot` until then.
    fn until_end_of(mut self, mut stream: PieceStream, slot: Slot) -> PieceStream {
        Box::pin(async_stream::stream! {
            let _slot = slot;
            while let Some(item) = stream.next().await {
                match &item {
                    Ok(piece) => {
                        self.bytes.fetch_add(piece.len() as u64, Ordering::Relaxed);
                    }
                    Err(status) => self.record(status.code()),
                }
                yield item;
            }
            self.record(tonic::Code::Ok);
        })
    }
}

impl Drop for RpcGuard {
    fn drop(&mut self) {
        self.record(tonic::Code::Cancelled);
    }
}

/// The digest for logs: hex when well-formed, else its length.
fn hex_or_raw(raw: &[u8]) -> String {
    match B3Digest::try_from(raw) {
        Ok(d) => d.to_hex(),
        Err(_) => format!("<{} bytes>", raw.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_resource_exhausted_and_says_so() {
        // 28 = ENOSPC, 122 = EDQUOT on Linux.
        for errno in [28, 122] {
            let err = Error::Io(std::io::Error::from_raw_os_error(errno));
            let status = to_status(Error::Shared(Arc::new(err)));
            assert_eq!(status.code(), tonic::Code::ResourceExhausted);
            assert!(status.message().starts_with("disk full: "), "{status:?}");
        }
        let other = to_status(Error::Io(std::io::Error::from_raw_os_error(5)));
        assert_eq!(other.code(), tonic::Code::Internal);
    }
}
