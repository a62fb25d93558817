//! Measures a verified read of one blob from a `disk` tier, in-process (no
//! gRPC, no client), beside single-thread BLAKE3 of the same bytes.
//!
//! ```sh
//! cargo run --release --example disk_read -- /tmp/disk-read 1024
//! ```
//!
//! Puts N MiB (default 1024) of reproducible data into a disk tier at DIR
//! unless it already holds them, then reads the blob through the tier five
//! times, every chunk checked against its digest, and hashes the data once
//! with BLAKE3. The reads find the chunks in the page cache after the
//! first. A read's chunk fetches run as tasks of their own, so the read
//! may use more than one core; the ratio to BLAKE3 shows how far it does.

use std::time::Instant;

use bytes::Bytes;
use strata::B3Digest;
use strata::blobservice::BlobService;
use strata::chunkstore::ChunkedBlobService;
use strata::kinds::disk::DiskStore;
use strata::testkit::pseudo_random;
use tokio::io::AsyncReadExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().ok_or("usage: disk_read DIR [MIB]")?);
    let mib: usize = args.next().map_or(Ok(1024), |s| s.parse())?;
    let data = Bytes::from(pseudo_random(mib << 20, 7));

    let started = Instant::now();
    let digest = B3Digest::of(&data);
    let blake3 = data.len() as f64 / started.elapsed().as_secs_f64() / 1e6;

    let svc = ChunkedBlobService::new(DiskStore::open(dir, u64::MAX).await?);
    if !svc.has(&digest).await? {
        let mut w = svc.open_write().await?;
        for piece in (0..data.len()).step_by(1 << 20) {
            w.write(data.slice(piece..(piece + (1 << 20)).min(data.len())))
                .await?;
        }
        w.close().await?;
    }
    println!("blake3 (1 thread): {blake3:.0} MB/s");
    let mut buf = vec![0u8; 1 << 20];
    for round in 1..=5 {
        let started = Instant::now();
        let mut reader = svc.open_read(&digest).await?.ok_or("the blob is absent")?;
        let mut at = 0;
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            if data.get(at..at + n) != Some(&buf[..n]) {
                return Err(format!("wrong bytes at {at}").into());
            }
            at += n;
        }
        if at != data.len() {
            return Err(format!("read {at} bytes of {}", data.len()).into());
        }
        let rate = at as f64 / started.elapsed().as_secs_f64() / 1e6;
        println!(
            "read {round}: {rate:.0} MB/s ({:.2} × BLAKE3)",
            rate / blake3
        );
    }
    Ok(())
}
