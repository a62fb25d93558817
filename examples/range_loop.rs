//! Reads 1 MiB ranges of blobs through one running server the way
//! `strata bench` reads its range ([`strata::testkit::read_range`]: Stat
//! with the chunk list, then the covering chunks, concurrently, each
//! checked against its digest), and
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

use strata::B3Digest;
use strata::addr::PeerAddr;
use strata::proto::snix::StatBlobRequest;
use strata::proto::snix::blob_service_client::BlobServiceClient;
use strata::testkit::read_range;

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
            read_range(&client, digest, start, start + RANGE).await?;
            times.push(started.elapsed().as_secs_f64() * 1e3);
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
