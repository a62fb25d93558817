//! Helpers shared by `strata bench`, the examples and the tests:
//! reproducible incompressible data, a process's CPU time, a proxy that
//! counts the bytes a peer serves, and a TCP proxy that breaks the first
//! connections made through it.

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
