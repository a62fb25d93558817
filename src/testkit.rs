//! Helpers shared by `strata bench`, the examples and the tests:
//! reproducible incompressible data, a process's CPU time, a proxy that
//! counts the bytes a peer serves, a TCP proxy that breaks the first
//! connections made through it, and a client's ranged read.

use prost::Message;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::proto::snix::blob_service_client::BlobServiceClient;
use crate::proto::snix::blob_service_server::BlobService;
use crate::proto::snix::{
    BlobChunk, PutBlobResponse, ReadBlobRequest, StatBlobRequest, StatBlobResponse,
};

/// `len` incompressible bytes, the same for the same `seed` (xorshift64).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `seconds` spent on `bytes`, scaled to a GiB: how the benchmarks report
/// CPU time.
pub fn per_gib(bytes: usize, seconds: f64) -> f64 {
    seconds * (1u64 << 30) as f64 / bytes as f64
}

/// CPU time (user and system, all threads) process `pid` has used so far,
/// in seconds, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: u32) -> std::io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name, which may hold spaces and
    // parentheses itself: the state first, utime and stime 12th and 13th
    // (fields 14 and 15 of proc(5)).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| std::io::Error::other("no CPU times in /proc stat"))
    };
    let per_second = rustix::param::clock_ticks_per_second();
    Ok((ticks(11)? + ticks(12)?) as f64 / per_second as f64)
}

/// A read-only BlobService that forwards Stat and Read to an upstream and
/// counts the bytes its Read responses carry: how much a sidecar really
/// fetched from its peer.
pub struct CountingProxy {
    upstream: BlobServiceClient<Channel>,
    read_bytes: Arc<AtomicU64>,
    stat_bytes: Arc<AtomicU64>,
}

impl CountingProxy {
    /// A proxy for `upstream`, and the counter of bytes it served.
    pub fn new(upstream: BlobServiceClient<Channel>) -> (Self, Arc<AtomicU64>) {
        let read_bytes = Arc::new(AtomicU64::new(0));
        (
            CountingProxy {
                upstream,
                read_bytes: read_bytes.clone(),
                stat_bytes: Arc::default(),
            },
            read_bytes,
        )
    }

    /// The counter of bytes its Stat responses carried (encoded).
    pub fn stat_bytes(&self) -> Arc<AtomicU64> {
        self.stat_bytes.clone()
    }
}

#[tonic::async_trait]
impl BlobService for CountingProxy {
    async fn stat(
        &self,
        request: Request<StatBlobRequest>,
    ) -> Result<Response<StatBlobResponse>, Status> {
        let resp = self.upstream.clone().stat(request.into_inner()).await?;
        self.stat_bytes
            .fetch_add(resp.get_ref().encoded_len() as u64, Ordering::Relaxed);
        Ok(resp)
    }

    type ReadStream = futures::stream::BoxStream<'static, Result<BlobChunk, Status>>;

    async fn read(
        &self,
        request: Request<ReadBlobRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let stream = self
            .upstream
            .clone()
            .read(request.into_inner())
            .await?
            .into_inner();
        let counter = self.read_bytes.clone();
        Ok(Response::new(
            stream
                .inspect(move |m| {
                    if let Ok(m) = m {
                        counter.fetch_add(m.data.len() as u64, Ordering::Relaxed);
                    }
                })
                .boxed(),
        ))
    }

    async fn put(
        &self,
        _request: Request<Streaming<BlobChunk>>,
    ) -> Result<Response<PutBlobResponse>, Status> {
        Err(Status::unimplemented("read-only proxy"))
    }
}

/// A TCP proxy on loopback in front of `upstream` that resets the first
/// `resets` connections made to it as soon as they are accepted (RST, as a
/// peer that crashed or restarted would), then forwards the others.
/// Returns its address and the number of connections accepted so far.
pub async fn resetting_proxy(
    upstream: std::net::SocketAddr,
    resets: u64,
) -> std::io::Result<(std::net::SocketAddr, Arc<AtomicU64>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            if n <= resets {
                // A zero linger makes the close a reset.
                let _ = conn.set_zero_linger();
                drop(conn);
                continue;
            }
            tokio::spawn(async move {
                let mut conn = conn;
                if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                }
            });
        }
    });
    Ok((addr, accepted))
}

/// Reads bytes `start..end` of a blob the way the protocol intends, as
/// `strata bench` times it: Stat for the chunk list, then only the chunks
/// covering the range, fetched concurrently (as strata's own ranged reader
/// fetches ahead), each checked against its digest. A chunk that fails its
/// check is `DATA_LOSS`; a list that does not cover the range, `OUT_OF_RANGE`.
pub async fn read_range(
    client: &BlobServiceClient<Channel>,
    digest: &crate::B3Digest,
    start: u64,
    end: u64,
) -> Result<bytes::Bytes, Status> {
    let stat = client
        .clone()
        .stat(StatBlobRequest {
            digest: (*digest).into(),
            send_chunks: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut covering = Vec::new();
    let mut offset = 0u64;
    for chunk in &stat.chunks {
        let (c_start, c_end) = (offset, offset.saturating_add(chunk.size));
        offset = c_end;
        if c_end > start && c_start < end {
            covering.push((c_start, c_end, chunk.digest.clone()));
        }
    }
    let fetched: Vec<(u64, u64, Vec<u8>)> = futures::stream::iter(covering)
        .map(|(c_start, c_end, chunk_digest)| async move {
            let mut stream = client
                .clone()
                .read(ReadBlobRequest {
                    digest: chunk_digest.clone(),
                })
                .await?
                .into_inner();
            let mut data = Vec::new();
            while let Some(msg) = stream.next().await {
                data.extend_from_slice(&msg?.data);
            }
            if data.len() as u64 != c_end - c_start
                || crate::B3Digest::of(&data).as_bytes()[..] != chunk_digest[..]
            {
                return Err(Status::data_loss("a chunk failed its check"));
            }
            Ok((c_start, c_end, data))
        })
        .buffered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, Status>>()?;
    let mut out = Vec::with_capacity(end.saturating_sub(start) as usize);
    for (c_start, c_end, data) in fetched {
        let from = start.saturating_sub(c_start) as usize;
        let to = (end.min(c_end) - c_start) as usize;
        out.extend_from_slice(&data[from..to]);
    }
    if out.len() as u64 != end - start {
        return Err(Status::out_of_range("range not covered by the chunk list"));
    }
    Ok(out.into())
}
