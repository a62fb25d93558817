//! A full disk: the `disk` tier lives on a 16 MiB tmpfs (mounted in a
//! private mount namespace, so the test needs no privileges where
//! unprivileged user namespaces are allowed) and is filled by Puts until
//! one fails. The failing Put ends with RESOURCE_EXHAUSTED saying "disk
//! full" — at once, without crashing the daemon; blobs stored before keep
//! reading back exactly; and after a restart every acknowledged blob is
//! still whole and the directory is consistent.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use strata::B3Digest;
use strata::proto::snix::BlobChunk;
use tonic::Code;

use crate::crash::{assert_absent_or_whole, assert_all_read_back, check_disk};
use crate::harness::{
    Daemon, eventually, put_blob, read_blob, snix_client, start_daemon, test_data,
};

/// Size of the file system: room for a dozen or so of the blobs below.
const FS_SIZE: &str = "16m";

/// A small tmpfs over a directory, in a mount namespace held open by a
/// sleeping process, so that daemons started one after another see the
/// same file system.
struct SmallFs {
    holder: Child,
    /// The directory the tmpfs is mounted over (empty outside the
    /// namespace).
    dir: tempfile::TempDir,
    /// Prefix that runs a command inside the namespace.
    wrapper: Vec<String>,
}

impl SmallFs {
    /// Mounts the tmpfs, trying a user namespace first (works unprivileged
    /// where the kernel allows it, and as root), then a plain mount
    /// namespace (root without user namespaces). Panics with what was tried
    /// when neither works: skipping would hide that the test did not run.
    fn mount() -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let attempts: [(&[&str], &[&str]); 2] = [
            (
                &["--user", "--map-root-user", "--mount"],
                &["--user", "--mount", "--preserve-credentials"],
            ),
            (&["--mount"], &["--mount"]),
        ];
        let mut failures = Vec::new();
        for (unshare_flags, nsenter_flags) in attempts {
            // `unshare --mount` makes the new namespace's mounts private,
            // so the tmpfs never shows outside it.
            let mut holder = match Command::new("unshare")
                .args(unshare_flags)
                .args([
                    "sh",
                    "-c",
                    "mount -t tmpfs -o size=\"$1\" strata-test \"$0\" && echo mounted && exec sleep 86400",
                ])
                .arg(dir.path())
                .arg(FS_SIZE)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
            {
                Ok(child) => child,
                Err(e) => {
                    failures.push(format!("unshare {unshare_flags:?}: {e}"));
                    continue;
                }
            };
            let mut line = String::new();
            let _ = BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line);
            if line.trim() == "mounted" {
                let mut wrapper = vec![
                    "nsenter".to_owned(),
                    "-t".to_owned(),
                    holder.id().to_string(),
                ];
                wrapper.extend(nsenter_flags.iter().map(|f| (*f).to_owned()));
                return SmallFs {
                    holder,
                    dir,
                    wrapper,
                };
            }
            let _ = holder.kill();
            let out = holder.wait_with_output().unwrap();
            failures.push(format!(
                "unshare {unshare_flags:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        panic!(
            "cannot mount a small tmpfs for the disk-full test (needs `unshare` and \
             `nsenter` from util-linux, and unprivileged user namespaces or root): {failures:#?}"
        );
    }

    /// The directory inside the namespace.
    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The same directory as the test process can see it: through the
    /// holder's root.
    fn view(&self) -> PathBuf {
        let inside = self.path().strip_prefix("/").unwrap();
        Path::new("/proc")
            .join(self.holder.id().to_string())
            .join("root")
            .join(inside)
    }
}

impl Drop for SmallFs {
    /// The namespace, and its tmpfs, go when the holder and the daemons
    /// in it are gone.
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Puts `data` (in 256 KiB messages); the digest or the error status.
async fn try_put(addr: &str, data: &[u8]) -> Result<B3Digest, tonic::Status> {
    let messages: Vec<BlobChunk> = data
        .chunks(256 << 10)
        .map(|c| BlobChunk {
            data: bytes::Bytes::copy_from_slice(c),
        })
        .collect();
    let mut client = snix_client(addr);
    let put = client.put(futures::stream::iter(messages));
    let resp = tokio::time::timeout(Duration::from_secs(60), put)
        .await
        .expect("a Put on a full disk hung")?;
    Ok(B3Digest::try_from(&resp.into_inner().digest).expect("a digest"))
}

/// A refusal for lack of space must say so.
fn assert_disk_full(status: &tonic::Status, when: &str) {
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{when}: a Put on a full disk failed with {status:?}"
    );
    assert!(
        status.message().contains("disk full"),
        "{when}: unclear message: {status:?}"
    );
}

/// Puts multi-chunk blobs of 0.7 to 1.5 MiB (seeded from `seed`) until one
/// is refused as disk full; returns the blobs stored and the one refused.
#[allow(clippy::type_complexity)]
async fn put_until_full(
    addr: &str,
    seed: u64,
) -> (Vec<(B3Digest, Vec<u8>)>, Vec<(B3Digest, Vec<u8>)>) {
    let mut stored: Vec<(B3Digest, Vec<u8>)> = Vec::new();
    let mut refused: Vec<(B3Digest, Vec<u8>)> = Vec::new();
    for i in 0..64u64 {
        let data = test_data(700_000 + (i as usize * 91_813) % 800_000, seed + i);
        match try_put(addr, &data).await {
            Ok(digest) => {
                assert_eq!(
                    digest,
                    B3Digest::of(&data),
                    "Put {i} answered a wrong digest"
                );
                stored.push((digest, data));
            }
            Err(status) => {
                assert_disk_full(&status, &format!("Put {i}"));
                refused.push((B3Digest::of(&data), data));
                break;
            }
        }
    }
    assert!(!refused.is_empty(), "64 Puts fitted into {FS_SIZE}");
    assert!(
        stored.len() >= 4,
        "only {} blobs fitted into {FS_SIZE}",
        stored.len()
    );
    (stored, refused)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_refuses_puts_clearly_and_keeps_what_it_has() {
    let fs = tokio::task::spawn_blocking(SmallFs::mount).await.unwrap();
    // max_size far above the file system, so the disk fills before the
    // tier would evict anything.
    let config = format!(
        "[blobservices.root]\ntype = \"disk\"\npath = \"{}\"\nmax_size = \"1GiB\"\n",
        fs.path().display()
    );
    let start = |config: String, fs_wrapper: Vec<String>| {
        tokio::task::spawn_blocking(move || Daemon::start_wrapped(&config, &fs_wrapper))
    };
    let mut daemon = start(config.clone(), fs.wrapper.clone()).await.unwrap();
    let addr = daemon.tcp_addr();

    let (mut stored, mut refused) = put_until_full(&addr, 3000).await;
    // More Puts, large and small: each is either stored whole or refused
    // the same way; the daemon is still up.
    for (i, len) in [3 << 20, 600_000, 5000, 3].into_iter().enumerate() {
        let data = test_data(len, 4000 + i as u64);
        match try_put(&addr, &data).await {
            Ok(digest) => {
                assert_eq!(digest, B3Digest::of(&data));
                stored.push((digest, data));
            }
            Err(status) => {
                assert_disk_full(&status, &format!("extra Put of {len} bytes"));
                refused.push((B3Digest::of(&data), data));
            }
        }
    }
    assert!(
        daemon.wait_timeout(Duration::ZERO).is_none(),
        "strata serve died on a full disk: {}",
        daemon.log_text()
    );

    // Everything stored before reads back exactly; what was refused is
    // not served (or, had its chunks all landed, served whole).
    assert_all_read_back(&addr, &stored, "on the full disk").await;
    for (digest, data) in &refused {
        assert_absent_or_whole(&addr, digest, data, "a refused Put").await;
    }
    check_disk(&fs.view(), "on the full disk");

    // Restart on the same (still full) file system, deleting nothing.
    let status = tokio::task::spawn_blocking(move || daemon.terminate())
        .await
        .unwrap();
    assert!(status.success(), "strata serve exited with {status}");
    let daemon = start(config, fs.wrapper.clone()).await.unwrap();
    let addr = daemon.tcp_addr();
    let after = check_disk(&fs.view(), "after the restart");
    assert_eq!(after.temporaries, 0, "temporary files survived the restart");
    assert_all_read_back(&addr, &stored, "after the restart").await;
    for (digest, data) in &refused {
        assert_absent_or_whole(&addr, digest, data, "a refused Put, after the restart").await;
    }
    // Still full, still refused clearly.
    let data = test_data(3 << 20, 5000);
    match try_put(&addr, &data).await {
        Ok(digest) => assert_eq!(digest, B3Digest::of(&data)),
        Err(status) => assert_disk_full(&status, "a Put after the restart"),
    }
    println!(
        "disk_full: {} blobs stored, {} Puts refused as disk full",
        stored.len(),
        refused.len()
    );
}

/// The usual sidecar shape on a full disk: memory before disk, Puts to the
/// disk (the default `write_to`), and a peer behind them. Puts are refused
/// as disk full, earlier blobs read back, and a cold read whose fill into
/// the full disk fails is still answered with the right bytes, read
/// directly from the peer; after a restart nothing is damaged.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_behind_memory_refuses_puts_and_still_serves_cold_reads() {
    let fs = tokio::task::spawn_blocking(SmallFs::mount).await.unwrap();
    let origin =
        start_daemon("[blobservices.root]\ntype = \"memory\"\nmax_size = \"64MiB\"\n".into()).await;
    // The memory tier takes fills of blobs up to half its size (2 MiB), so
    // a larger cold blob can only be filled into the disk.
    let config = format!(
        "[blobservices.root]\ntype = \"tiers\"\ntiers = [\"memory\", \"disk\", \"origin\"]\n\n\
         [blobservices.memory]\ntype = \"memory\"\nmax_size = \"4MiB\"\n\n\
         [blobservices.disk]\ntype = \"disk\"\npath = \"{}\"\nmax_size = \"1GiB\"\n\n\
         [blobservices.origin]\ntype = \"grpc\"\nurl = \"{}\"\n",
        fs.path().display(),
        origin.tcp_addr()
    );
    let start = |config: String, fs_wrapper: Vec<String>| {
        tokio::task::spawn_blocking(move || Daemon::start_wrapped(&config, &fs_wrapper))
    };
    let mut daemon = start(config.clone(), fs.wrapper.clone()).await.unwrap();
    let addr = daemon.tcp_addr();

    let (stored, refused) = put_until_full(&addr, 6000).await;
    assert_all_read_back(&addr, &stored, "memory + full disk").await;
    for (digest, data) in &refused {
        assert_absent_or_whole(&addr, digest, data, "a refused Put").await;
    }

    // Cold reads: blobs only the origin has. The large one can go only to
    // the disk, where it does not fit; the small one lands in memory.
    let large = test_data(3 << 20, 6100);
    let small = test_data(300_000, 6101);
    let mut cold = Vec::new();
    for data in [large, small] {
        let digest = put_blob(&origin.tcp_addr(), &data).await;
        let got = read_blob(&addr, &digest)
            .await
            .unwrap_or_else(|e| panic!("cold read of {} bytes failed: {e:?}", data.len()));
        assert!(
            got == data,
            "cold read of {} bytes: wrong bytes",
            data.len()
        );
        cold.push((digest, data));
    }
    // The large blob's fill into the full disk failed. Its reader got the
    // right bytes (checked above) either streamed from the fill before the
    // disk refused them, or read directly from the origin after (which of
    // the two depends on how far the stream was when the disk refused):
    // the log says the fill failed, not which.
    let large_hex = cold[0].0.to_string();
    let fill_failed = || {
        daemon.log_text().lines().any(|line| {
            line.contains(&large_hex)
                && line.contains("failed")
                && line.contains("No space left on device")
        })
    };
    assert!(
        eventually(Duration::from_secs(10), fill_failed).await,
        "no failed fill of the large cold blob was logged:\n{}",
        daemon.log_text()
    );
    let log = daemon.log_text();
    assert!(
        daemon.wait_timeout(Duration::ZERO).is_none(),
        "strata serve died on a full disk: {log}"
    );
    check_disk(&fs.view(), "memory + full disk");

    // Restart: what was stored is whole, nothing half-written is left,
    // and the cold blobs still read right (from wherever they are).
    let status = tokio::task::spawn_blocking(move || daemon.terminate())
        .await
        .unwrap();
    assert!(status.success(), "strata serve exited with {status}");
    let daemon = start(config, fs.wrapper.clone()).await.unwrap();
    let addr = daemon.tcp_addr();
    let after = check_disk(&fs.view(), "memory + disk, after the restart");
    assert_eq!(after.temporaries, 0, "temporary files survived the restart");
    assert_all_read_back(&addr, &stored, "memory + disk, after the restart").await;
    assert_all_read_back(&addr, &cold, "cold blobs, after the restart").await;
    for (digest, data) in &refused {
        assert_absent_or_whole(&addr, digest, data, "a refused Put, after the restart").await;
    }
}
