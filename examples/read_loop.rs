//! Reads one blob from several servers in turn, many times, and prints
//! each read's rate and the CPU time the serving process spent on it: an
//! A/B comparison of two builds serving the same data, read alternately so
//! that whatever else loads the machine falls on both.
//!
//! ```sh
//! cargo run --release --example read_loop -- DIGEST[,DIGEST...] ROUNDS ADDR=PID [ADDR=PID...]
//! ```
//!
//! Round `r` reads the `r`-th digest of the list (cycling), from every
//! server in turn: with as many digests as rounds, each read is a cold one
//! for every server that has to fetch its blobs from a peer.
//!
//! The client only counts the bytes it receives; the verification being
//! measured is the server's. Each line is `server round MB/s CPU-s/GiB`;
//! the median of each server's rounds closes the output.

use std::time::Instant;

use futures::StreamExt;
use strata::B3Digest;
use strata::addr::PeerAddr;
use strata::proto::snix::ReadBlobRequest;
use strata::proto::snix::blob_service_client::BlobServiceClient;
use strata::testkit::{cpu_seconds, per_gib};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: read_loop DIGEST[,DIGEST...] ROUNDS ADDR=PID...";
    let digests = args
        .next()
        .ok_or(usage)?
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<B3Digest>, _>>()?;
    let rounds: usize = args.next().ok_or(usage)?.parse()?;
    let mut servers = Vec::new();
    for arg in args {
        let (addr, pid) = arg.split_once('=').ok_or(usage)?;
        let addr: PeerAddr = addr.parse()?;
        let client = BlobServiceClient::new(addr.channel(std::time::Duration::from_secs(5))?)
            .max_decoding_message_size(64 << 20);
        servers.push((
            arg.clone(),
            client,
            pid.parse::<u32>()?,
            Vec::new(),
            Vec::new(),
        ));
    }
    for round in 0..rounds {
        let digest = digests[round % digests.len()];
        for (name, client, pid, rates, cpus) in &mut servers {
            let cpu = cpu_seconds(*pid)?;
            let started = Instant::now();
            let mut stream = client
                .read(ReadBlobRequest {
                    digest: digest.into(),
                })
                .await?
                .into_inner();
            let mut got = 0usize;
            while let Some(msg) = stream.next().await {
                got += msg?.data.len();
            }
            let secs = started.elapsed().as_secs_f64();
            let cpu = per_gib(got, cpu_seconds(*pid)? - cpu);
            let rate = got as f64 / secs / 1e6;
            println!("{name} {round} {rate:.0} {cpu:.2}");
            rates.push(rate);
            cpus.push(cpu);
        }
    }
    for (name, _, _, rates, cpus) in servers {
        println!(
            "median {name}: {:.0} MB/s, {:.2} CPU-s/GiB",
            median(rates),
            median(cpus)
        );
    }
    Ok(())
}
