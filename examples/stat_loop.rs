//! Stats one blob over and over for a while, one at a time on one
//! connection, and prints how many answered and their latency
//! percentiles: how quickly the server answers while something else
//! (a Put, a read) keeps it busy.
//!
//! ```sh
//! cargo run --release --example stat_loop -- ADDR DIGEST SECONDS
//! ```

use std::time::{Duration, Instant};

use strata::B3Digest;
use strata::addr::PeerAddr;
use strata::proto::snix::StatBlobRequest;
use strata::proto::snix::blob_service_client::BlobServiceClient;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let usage = "usage: stat_loop ADDR DIGEST SECONDS";
    let mut args = std::env::args().skip(1);
    let addr: PeerAddr = args.next().ok_or(usage)?.parse()?;
    let digest: B3Digest = args.next().ok_or(usage)?.parse()?;
    let seconds: f64 = args.next().ok_or(usage)?.parse()?;
    let mut client = BlobServiceClient::new(addr.channel(Duration::from_secs(5))?);
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut times = Vec::new();
    while Instant::now() < until {
        let started = Instant::now();
        client
            .stat(StatBlobRequest {
                digest: digest.into(),
                ..Default::default()
            })
            .await?;
        times.push(started.elapsed());
    }
    if times.is_empty() {
        return Err("no Stat answered in the time given".into());
    }
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    println!(
        "{} stats: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
        times.len(),
        at(0.5),
        at(0.99),
        at(0.999),
        at(1.0)
    );
    Ok(())
}
