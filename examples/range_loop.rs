//! Reads 1 MiB ranges of blobs through one running server the way
//! `strata bench` reads its range (Stat with the chunk list, then the
//! covering chunks, concurrently, each checked against its digest), and
//! prints the median time: cold ranges of cold blobs through a server that
//! is already up, where the bench's `range_read_ms` takes a fresh sidecar
//! for each sample.
//!
//! ```sh
//! cargo run --release --example range_loop -- DIGEST[,DIGEST...] ADDR OFFSET[,OFFSET...]
//! ```
//!
//! Every offset is read from every digest, each pair once: with distinct
//! offsets far enough apart, each range is cold for a server that fetches
//! its blobs from a peer (the chunks around it were never fetched). One
//! unrelated Stat first makes the connection.

use std::time::Instant;

use futures::StreamExt;
use strata::B3Digest;
use strata::addr::PeerAddr;
use strata::proto::snix::blob_service_client::BlobServiceClient;
use strata::proto::snix::{ReadBlobRequest, StatBlobRequest};

const RANGE: u64 = 1 << 20;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let usage = "usage: range_loop DIGEST[,DIGEST...] ADDR OFFSET[,OFFSET...]";
    let mut args = std::env::args().skip(1);
    let digests = args
        .next()
        .ok_or(usage)?
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<B3Digest>, _>>()?;
    let addr: PeerAddr = args.next().ok_or(usage)?.parse()?;
    let offsets = args
        .next()
        .ok_or(usage)?
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<u64>, _>>()?;
    let client = BlobServiceClient::new(addr.channel(std::time::Duration::from_secs(5))?)
        .max_decoding_message_size(64 << 20);
    let _absent = client
        .clone()
        .stat(StatBlobRequest {
            digest: B3Digest::of(b"range_loop: connect first").into(),
            ..Default::default()
        })
        .await;
    let mut times = Vec::new();
    for &start in &offsets {
        for digest in &digests {
            let started = Instant::now();
            let got = read_range(&client, digest, start).await?;
            times.push(started.elapsed().as_secs_f64() * 1e3);
            if got != RANGE {
                return Err(format!("{digest} at {start}: {got} bytes").into());
            }
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{} ranges: median {:.2} ms, fastest {:.2}, slowest {:.2}",
        times.len(),
        times[times.len() / 2],
        times[0],
        times[times.len() - 1]
    );
    Ok(())
}

/// Reads `RANGE` bytes from `start` and returns how many of them arrived.
async fn read_range(
    client: &BlobServiceClient<tonic::transport::Channel>,
    digest: &B3Digest,
    start: u64,
) -> Result<u64, Box<dyn std::error::Error>> {
    let end = start + RANGE;
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
    let mut offset = 0;
    for chunk in &stat.chunks {
        let (from, to) = (offset, offset + chunk.size);
        offset = to;
        if to > start && from < end {
            covering.push((from, to, chunk.digest.clone()));
        }
    }
    let reads = futures::stream::iter(covering).map(|(from, to, chunk)| async move {
        let mut stream = client
            .clone()
            .read(ReadBlobRequest {
                digest: chunk.clone(),
            })
            .await?
            .into_inner();
        let mut data = Vec::new();
        while let Some(message) = stream.next().await {
            data.extend_from_slice(&message?.data);
        }
        if B3Digest::of(&data) != B3Digest::try_from(&chunk[..])? {
            return Err("a chunk failed its check".into());
        }
        Ok::<u64, Box<dyn std::error::Error>>(end.min(to) - start.max(from))
    });
    let mut got = 0;
    let mut reads = std::pin::pin!(reads.buffered(8));
    while let Some(n) = reads.next().await {
        got += n?;
    }
    Ok(got)
}
