//! Puts a file the way a stock client does: tonic's generated client, in
//! 1 MiB messages, as `strata bench` puts its blob (where `strata put`
//! frames its pieces by hand, which reaches the server in other frames).
//! Prints the digest, the rate, and the client's own CPU time (user +
//! system, all its threads) per GiB while the Put ran: on one machine,
//! the share of the cores the client leaves the server.
//!
//! ```sh
//! cargo run --release --example tonic_put -- ADDR FILE
//! ```

use std::time::Instant;

use bytes::Bytes;
use strata::B3Digest;
use strata::addr::PeerAddr;
use strata::proto::snix::BlobChunk;
use strata::proto::snix::blob_service_client::BlobServiceClient;
use strata::testkit::{cpu_seconds, per_gib};

const MESSAGE: usize = 1 << 20;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let usage = "usage: tonic_put ADDR FILE";
    let mut args = std::env::args().skip(1);
    let addr: PeerAddr = args.next().ok_or(usage)?.parse()?;
    let data = Bytes::from(std::fs::read(args.next().ok_or(usage)?)?);
    let mut client = BlobServiceClient::new(addr.channel(std::time::Duration::from_secs(5))?)
        .max_encoding_message_size(4 << 20);
    let messages: Vec<BlobChunk> = (0..data.len())
        .step_by(MESSAGE)
        .map(|i| BlobChunk {
            data: data.slice(i..(i + MESSAGE).min(data.len())),
        })
        .collect();
    let cpu = cpu_seconds(std::process::id())?;
    let started = Instant::now();
    let answer = client
        .put(futures::stream::iter(messages))
        .await?
        .into_inner();
    let elapsed = started.elapsed();
    let cpu = cpu_seconds(std::process::id())? - cpu;
    let digest = B3Digest::try_from(&answer.digest[..])?;
    println!(
        "{digest} {:.0} MB/s client {:.2} CPU-s/GiB",
        data.len() as f64 / elapsed.as_secs_f64() / 1e6,
        per_gib(data.len(), cpu)
    );
    Ok(())
}
