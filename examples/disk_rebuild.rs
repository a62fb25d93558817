//! Measures how long a `disk` tier takes to rebuild its index at start-up.
//!
//! ```sh
//! cargo run --release --example disk_rebuild -- /tmp/rebuild 1000000
//! ```
//!
//! Fills DIR (if it holds fewer files) with N small chunk files in the disk
//! tier's layout, then times `DiskStore::open` on it twice. Both opens find
//! the directory entries in the kernel's cache (they were just written or
//! scanned); drop caches first to time a cold disk.

use std::time::Instant;

use strata::B3Digest;
use strata::kinds::disk::DiskStore;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().ok_or("usage: disk_rebuild DIR [N]")?);
    let n: u64 = args.next().map_or(Ok(1_000_000), |s| s.parse())?;

    let chunks = dir.join("chunks");
    let existing = if chunks.is_dir() {
        std::fs::read_dir(&chunks)?
            .filter_map(|e| e.ok())
            .map(|e| std::fs::read_dir(e.path()).map_or(0, |d| d.count() as u64))
            .sum()
    } else {
        0
    };
    if existing < n {
        let started = Instant::now();
        for i in existing..n {
            let data = i.to_le_bytes();
            let hex = B3Digest::of(&data).to_hex();
            let sub = chunks.join(&hex[..2]);
            std::fs::create_dir_all(&sub)?;
            std::fs::write(sub.join(&hex), data)?;
        }
        eprintln!("created {} files in {:?}", n - existing, started.elapsed());
    }
    for round in ["first", "second"] {
        let started = Instant::now();
        let store = DiskStore::open(dir.clone(), u64::MAX).await?;
        let elapsed = started.elapsed();
        println!(
            "{round} open: {n} files, {} bytes indexed in {:.2} s",
            store.used_bytes(),
            elapsed.as_secs_f64()
        );
    }
    Ok(())
}
