//! Compares the speed of strata's FastCDC cut scan with the `fastcdc`
//! crate's and with single-thread BLAKE3, on the same data in one run.
//!
//! ```sh
//! cargo run --release --example chunking -- 256
//! ```
//!
//! Cuts N MiB of random data (default 256) into 256 KiB-average chunks
//! with each scan, checks both found the same cuts, and hashes the data
//! once with BLAKE3. Each is run five times, alternating; the best time of
//! each is reported, as MB/s of input and as a ratio to BLAKE3.

use std::time::{Duration, Instant};

use fastcdc::v2020::FastCDC;
use rand::{RngCore, SeedableRng};
use strata::chunkstore::{Chunking, Cutter};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: usize = std::env::args().nth(1).map_or(Ok(256), |s| s.parse())?;
    let mut data = vec![0u8; mib << 20];
    rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut data);
    let chunking = Chunking::default();
    let cutter = Cutter::new(chunking);

    let crate_cuts = || {
        FastCDC::new(&data, chunking.min(), chunking.avg, chunking.max())
            .map(|c| c.offset + c.length)
            .collect::<Vec<_>>()
    };
    let our_cuts = || {
        let mut cuts = Vec::new();
        let mut at = 0;
        while at < data.len() {
            at += cutter.cut(&data[at..]);
            cuts.push(at);
        }
        cuts
    };
    let expected = crate_cuts();
    if our_cuts() != expected {
        return Err("the two scans cut differently".into());
    }

    let mut best = [Duration::MAX; 3];
    for _ in 0..5 {
        let timed = |f: &dyn Fn()| {
            let started = Instant::now();
            f();
            started.elapsed()
        };
        let runs = [
            timed(&|| assert_eq!(crate_cuts().len(), expected.len())),
            timed(&|| assert_eq!(our_cuts().len(), expected.len())),
            timed(&|| {
                std::hint::black_box(blake3::hash(&data));
            }),
        ];
        for (b, r) in best.iter_mut().zip(runs) {
            *b = (*b).min(r);
        }
    }
    let mbps = |d: Duration| data.len() as f64 / d.as_secs_f64() / 1e6;
    let blake3 = mbps(best[2]);
    println!("{} MiB, {} chunks", mib, expected.len());
    for (name, d) in [
        ("fastcdc crate cut", best[0]),
        ("strata Cutter", best[1]),
        ("BLAKE3 (1 thread)", best[2]),
    ] {
        println!(
            "{name:<20} {:>8.0} MB/s  {:>5.2}x BLAKE3",
            mbps(d),
            mbps(d) / blake3
        );
    }
    Ok(())
}
