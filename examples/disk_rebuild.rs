//! Measures how long a `disk` tier takes to rebuild its index at start-up.
//!
//! ```sh
//! cargo run --release --example disk_rebuild -- /tmp/rebuild 1000000
//! cargo run --release --example disk_rebuild -- /tmp/big 40000 262144
//! ```
//!
//! Fills DIR (if it holds no packs yet) with N chunks of SIZE bytes
//! (default 8) through the tier, then times `DiskStore::open` on it twice. The rebuild reads every
//! record header of every pack, so its cost grows with the number of
//! chunks, not their size. Both opens find the packs in the kernel's page
//! cache (they were just written or scanned); drop caches first to time a
//! cold disk.

use std::time::Instant;

use bytes::Bytes;
use strata::B3Digest;
use strata::chunkstore::ChunkStore;
use strata::kinds::disk::DiskStore;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().ok_or("usage: disk_rebuild DIR [N]")?);
    let n: u64 = args.next().map_or(Ok(1_000_000), |s| s.parse())?;
    let size: usize = args.next().map_or(Ok(8), |s| s.parse())?;

    let filled = std::fs::read_dir(dir.join("packs")).is_ok_and(|mut d| d.next().is_some());
    if !filled {
        let started = Instant::now();
        let store = DiskStore::open(dir.clone(), u64::MAX).await?;
        let mut chunk = vec![0u8; size.max(8)];
        for i in 0..n {
            chunk[..8].copy_from_slice(&i.to_le_bytes());
            let data = Bytes::copy_from_slice(&chunk);
            store.put_chunk(B3Digest::of(&data), data).await?;
        }
        eprintln!("stored {n} chunks in {:?}", started.elapsed());
    }
    for round in ["first", "second"] {
        let started = Instant::now();
        let store = DiskStore::open(dir.clone(), u64::MAX).await?;
        let elapsed = started.elapsed();
        println!(
            "{round} open: {} bytes indexed in {:.2} s",
            store.used_bytes(),
            elapsed.as_secs_f64()
        );
    }
    Ok(())
}
