//! Lying strata peers, as separate processes on loopback, behind a sidecar
//! whose tiers are `[near disk, liar, honest peer]`. Whatever the liar does,
//! the client gets the right bytes (from the honest peer) or, with no honest
//! tier, a clean error; the near tier holds no byte from the liar; the
//! sidecar logs the liar's failure.
//!
//! The liar is this test binary run again as a child process (the ignored
//! test [`fault_peer_process`]), serving a strata blob service over memory
//! through a lying gRPC front.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use strata::B3Digest;
use strata::blobservice::BlobService;
use strata::chunkstore::ChunkedBlobService;
use strata::kinds::memory::MemoryStore;
use strata::proto::snix::blob_service_server::{BlobService as GrpcBlobService, BlobServiceServer};
use strata::proto::snix::{
    BlobChunk, PutBlobResponse, ReadBlobRequest, StatBlobRequest, StatBlobResponse,
    stat_blob_response,
};
use tokio::io::AsyncReadExt;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use crate::harness::{Daemon, eventually, memory_origin, metric, put_blob, read_blob, test_data};

const SIZE: usize = 3 << 20;
const SEED: u64 = 77;

/// The blob every peer serves.
fn blob() -> Vec<u8> {
    test_data(SIZE, SEED)
}

/// The same blob with one byte changed in the middle: a valid, different
/// blob whose chunk list mostly matches the real one's.
fn other_blob() -> Vec<u8> {
    let mut d = blob();
    d[SIZE / 2] ^= 0x55;
    d
}

/// How the liar lies.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Lie {
    /// Flips one byte of whatever it reads out.
    FlipByte,
    /// Lists the chunks of another blob (each valid) under the digest.
    WrongChunks,
    /// Moves 1000 bytes from the first chunk's listed size to the second's.
    ChunkSizes,
    /// Lists the first two chunks 2^63 bytes larger each: sizes no store
    /// cuts, whose sum wraps around to the blob's true length.
    HugeChunks,
    /// Drops the last byte of each read.
    Truncate,
    /// Appends bytes to each read.
    Append,
    /// Sends the outboard of another blob.
    WrongOutboard,
    /// Sends half of each read, then nothing, forever.
    Stall,
    /// Sends half of the first read, then exits.
    Die,
    /// Flips one byte of the blob's last chunk only, so a streaming reader
    /// has delivered the chunks before it when the lie shows.
    FlipLast,
    /// Sends half of the blob's last chunk, then exits.
    DieLast,
}

const LIES: &[Lie] = &[
    Lie::FlipByte,
    Lie::WrongChunks,
    Lie::ChunkSizes,
    Lie::HugeChunks,
    Lie::Truncate,
    Lie::Append,
    Lie::WrongOutboard,
    Lie::Stall,
    Lie::Die,
    Lie::FlipLast,
    Lie::DieLast,
];

fn lie_name(lie: Lie) -> String {
    format!("{lie:?}")
}

fn parse_lie(name: &str) -> Lie {
    *LIES
        .iter()
        .find(|l| lie_name(**l) == name)
        .expect("known lie")
}

/// The liar's gRPC front over an honest store.
struct Liar {
    store: Arc<dyn BlobService>,
    digest: B3Digest,
    other: B3Digest,
    lie: Lie,
}

impl Liar {
    /// What an honest strata peer answers, with the outboard always sent
    /// (at the stored shift).
    async fn honest_stat(&self, digest: &B3Digest) -> Result<StatBlobResponse, Status> {
        let internal = |e: strata::Error| Status::internal(e.to_string());
        let stat = self
            .store
            .stat(digest)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found("absent"))?;
        let outboard = self.store.outboard(digest).await.map_err(internal)?;
        Ok(StatBlobResponse {
            size: stat.size,
            chunks: stat
                .chunks
                .iter()
                .map(|c| stat_blob_response::ChunkMeta {
                    digest: c.digest.into(),
                    size: c.size,
                })
                .collect(),
            bao: outboard
                .as_ref()
                .map(|o| o.data().clone())
                .unwrap_or_default(),
            bao_shift: outboard.as_ref().map_or(0, |o| o.shift().into()),
            ..Default::default()
        })
    }
}

#[tonic::async_trait]
impl GrpcBlobService for Liar {
    async fn stat(
        &self,
        request: Request<StatBlobRequest>,
    ) -> Result<Response<StatBlobResponse>, Status> {
        let digest = B3Digest::try_from(&request.get_ref().digest)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut resp = self.honest_stat(&digest).await?;
        if digest == self.digest {
            match self.lie {
                Lie::WrongChunks => resp.chunks = self.honest_stat(&self.other).await?.chunks,
                Lie::ChunkSizes => {
                    resp.chunks[0].size -= 1000;
                    resp.chunks[1].size += 1000;
                }
                Lie::HugeChunks => {
                    for chunk in &mut resp.chunks[..2] {
                        chunk.size = chunk.size.wrapping_add(1 << 63);
                    }
                }
                Lie::WrongOutboard => resp.bao = self.honest_stat(&self.other).await?.bao,
                _ => {}
            }
        }
        Ok(Response::new(resp))
    }

    type ReadStream = futures::stream::BoxStream<'static, Result<BlobChunk, Status>>;

    async fn read(
        &self,
        request: Request<ReadBlobRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let digest = B3Digest::try_from(&request.get_ref().digest)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut reader = self
            .store
            .open_read(&digest)
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::not_found("absent"))?;
        let mut data = Vec::new();
        reader.read_to_end(&mut data).await?;
        let mut half = data.len() / 2;
        let mut chunks = self.honest_stat(&self.digest).await?.chunks;
        let last_chunk = chunks.pop();
        let is_last_chunk = last_chunk
            .as_ref()
            .is_some_and(|c| c.digest == request.get_ref().digest);
        if digest == self.digest
            && let Some(last) = &last_chunk
            && matches!(self.lie, Lie::FlipLast | Lie::DieLast)
        {
            // The whole blob in one Read: the lie is in its last chunk.
            half = data.len() - (last.size / 2) as usize;
        }
        let lie = match self.lie {
            Lie::FlipLast if is_last_chunk || digest == self.digest => Lie::FlipByte,
            Lie::DieLast if is_last_chunk || digest == self.digest => Lie::Die,
            Lie::FlipLast | Lie::DieLast => Lie::WrongChunks, // honest reads
            other => other,
        };
        match lie {
            Lie::FlipByte => data[half] ^= 1,
            Lie::Truncate => {
                data.pop();
            }
            Lie::Append => data.extend_from_slice(b"trailing"),
            Lie::Stall => {
                let first = Ok(BlobChunk {
                    data: Bytes::copy_from_slice(&data[..half]),
                });
                let stream = futures::stream::iter([first]).chain(futures::stream::pending());
                return Ok(Response::new(stream.boxed()));
            }
            Lie::Die => {
                let first = Ok(BlobChunk {
                    data: Bytes::copy_from_slice(&data[..half]),
                });
                let die = futures::stream::once(async {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    std::process::exit(3);
                });
                return Ok(Response::new(
                    futures::stream::iter([first]).chain(die).boxed(),
                ));
            }
            _ => {}
        }
        let data = Bytes::from(data);
        let pieces: Vec<_> = (0..data.len())
            .step_by(64 * 1024)
            .map(|i| {
                Ok(BlobChunk {
                    data: data.slice(i..(i + 64 * 1024).min(data.len())),
                })
            })
            .collect();
        Ok(Response::new(futures::stream::iter(pieces).boxed()))
    }

    async fn put(
        &self,
        _request: Request<Streaming<BlobChunk>>,
    ) -> Result<Response<PutBlobResponse>, Status> {
        Err(Status::unimplemented("read-only liar"))
    }
}

/// The liar process's body: runs only when started by [`FaultPeer::start`].
#[tokio::test]
#[ignore = "started as a child process by the adversarial tests"]
async fn fault_peer_process() {
    let lie = parse_lie(&std::env::var("STRATA_FAULT_PEER").expect("STRATA_FAULT_PEER"));
    let store: Arc<dyn BlobService> = Arc::new(ChunkedBlobService::new(MemoryStore::new(64 << 20)));
    let mut digests = Vec::new();
    for data in [blob(), other_blob()] {
        let mut w = store.open_write().await.unwrap();
        w.write(data.into()).await.unwrap();
        digests.push(w.close().await.unwrap().digest);
    }
    let liar = Liar {
        store,
        digest: digests[0],
        other: digests[1],
        lie,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("LISTENING {}", listener.local_addr().unwrap());
    tonic::transport::Server::builder()
        .add_service(BlobServiceServer::new(liar))
        .serve_with_incoming(TcpIncoming::from(listener))
        .await
        .unwrap();
}

/// A liar process, killed when dropped.
struct FaultPeer {
    child: Child,
    addr: String,
}

impl FaultPeer {
    fn start(lie: Lie) -> FaultPeer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "adversarial::fault_peer_process",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("STRATA_FAULT_PEER", lie_name(lie))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the fault peer");
        let stdout = child.stdout.take().unwrap();
        let addr = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("LISTENING ").map(str::to_owned))
            .expect("the fault peer announces its address");
        FaultPeer {
            child,
            addr: format!("grpc+http://{addr}"),
        }
    }
}

impl Drop for FaultPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sidecar_config(near: &Path, liar: &str, honest: Option<&str>, fill: &str) -> String {
    let mut tiers = vec!["near", "liar"];
    let mut config = format!(
        "[blobservices.near]\ntype = \"disk\"\npath = \"{}\"\nmax_size = \"1GiB\"\n\n\
         [blobservices.liar]\ntype = \"grpc\"\nurl = \"{liar}\"\nfirst_byte_timeout = \"2s\"\nidle_timeout = \"2s\"\n\n",
        near.display()
    );
    if let Some(honest) = honest {
        tiers.push("honest");
        config.push_str(&format!(
            "[blobservices.honest]\ntype = \"grpc\"\nurl = \"{honest}\"\n\n"
        ));
    }
    config.push_str(&format!(
        "[blobservices.root]\ntype = \"tiers\"\ntiers = {tiers:?}\nfill = \"{fill}\"\n"
    ));
    config
}

/// A sidecar, with its metrics endpoint, over the tiers of
/// [`sidecar_config`].
async fn start_sidecar(near: &Path, liar: &str, honest: Option<&str>, fill: &str) -> Daemon {
    let config = sidecar_config(near, liar, honest, fill);
    tokio::task::spawn_blocking(move || Daemon::start_with_metrics(Some(&config)))
        .await
        .unwrap()
}

/// A daemon serving the disk tier in `near` alone.
async fn near_alone(near: &Path) -> Daemon {
    let config = format!(
        "[blobservices.root]\ntype = \"disk\"\npath = \"{}\"\n",
        near.display()
    );
    tokio::task::spawn_blocking(move || Daemon::start(Some(&config)))
        .await
        .unwrap()
}

/// Every chunk in a disk tier hashes to its digest, and the blob, if
/// present, reads back right from the disk tier alone.
async fn assert_near_tier_clean(near: &Path, digest: &B3Digest, lie: Lie) {
    for chunk in strata::kinds::disk::stored_chunks(near).unwrap() {
        assert_eq!(
            B3Digest::of(&chunk.data),
            chunk.digest,
            "{lie:?}: a stored chunk does not hash to its digest"
        );
    }
    let disk = near_alone(near).await;
    if let Ok(got) = read_blob(&disk.tcp_addr(), digest).await {
        assert!(got == blob(), "{lie:?}: the near tier holds a wrong blob");
    }
}

/// A `memory` daemon holding the blob, and the blob's digest.
async fn honest_peer() -> (Daemon, B3Digest) {
    let honest = memory_origin().await;
    let digest = put_blob(&honest.tcp_addr(), &blob()).await;
    (honest, digest)
}

#[tokio::test(flavor = "multi_thread")]
async fn liars_fall_through_to_the_honest_peer_and_poison_nothing() {
    let (honest, digest) = honest_peer().await;
    for &lie in LIES {
        let liar = FaultPeer::start(lie);
        let near = tempfile::tempdir().unwrap();
        let sidecar =
            start_sidecar(near.path(), &liar.addr, Some(&honest.tcp_addr()), "sync").await;
        let got = read_blob(&sidecar.tcp_addr(), &digest).await;
        let got = got.unwrap_or_else(|f| panic!("{lie:?}: {f:?}\n{}", sidecar.log_text()));
        assert!(got == blob(), "{lie:?}: wrong bytes");
        // The client of a sync fill gets each proven byte as it arrives,
        // so a lie past the blob's last byte (Append) is caught by the
        // fill after the client has its answer.
        let logged = || {
            let log = sidecar.log_text();
            log.contains("liar") && log.contains("trying the next tier")
        };
        assert!(
            eventually(Duration::from_secs(20), logged).await,
            "{lie:?}: the liar's failure is not logged:\n{}",
            sidecar.log_text()
        );
        let page = sidecar.metrics();
        let lies = metric(
            &page,
            "strata_tier_verification_failures_total{tier=\"liar\"}",
        );
        let errors = metric(&page, "strata_tier_errors_total{tier=\"liar\"}");
        if matches!(lie, Lie::Stall | Lie::Die | Lie::DieLast) {
            assert!(errors >= 1.0, "{lie:?}: no error counted:\n{page}");
        } else {
            assert!(
                lies >= 1.0,
                "{lie:?}: no verification failure counted:\n{page}"
            );
        }
        assert_eq!(
            metric(
                &page,
                "strata_tier_verification_failures_total{tier=\"honest\"}"
            ),
            0.0,
            "{lie:?}"
        );
        drop(sidecar);
        assert_near_tier_clean(near.path(), &digest, lie).await;
    }
}

/// Lies that are data failing verification (not a stall or a death).
const DATA_LIES: &[Lie] = &[
    Lie::FlipByte,
    Lie::WrongChunks,
    Lie::ChunkSizes,
    Lie::Truncate,
    Lie::Append,
    Lie::WrongOutboard,
    Lie::FlipLast,
];

/// A `memory` tier hands out the chunks it holds without hashing them again,
/// so it must only ever be given proven ones. A liar's fill leaves the
/// chunks it proved before its lie in memory; the liar is then passed over
/// for the blob, the honest peer's fill completes the blob from those and
/// its own, and with both peers gone the blob still reads right from
/// memory.
#[tokio::test(flavor = "multi_thread")]
async fn a_memory_tier_behind_a_liar_serves_only_what_was_proven() {
    for &lie in DATA_LIES {
        let (honest, digest) = honest_peer().await;
        let liar = FaultPeer::start(lie);
        let config = format!(
            "[blobservices.mem]\ntype = \"memory\"\nmax_size = \"64MiB\"\n\n\
             [blobservices.liar]\ntype = \"grpc\"\nurl = \"{}\"\n\n\
             [blobservices.honest]\ntype = \"grpc\"\nurl = \"{}\"\n\n\
             [blobservices.root]\ntype = \"tiers\"\ntiers = [\"mem\", \"liar\", \"honest\"]\n\
             fill = \"sync\"\n",
            liar.addr,
            honest.tcp_addr()
        );
        let sidecar = tokio::task::spawn_blocking(move || Daemon::start(Some(&config)))
            .await
            .unwrap();
        // The first read meets the lie and is served by the honest peer;
        // the second passes the liar over and fills memory from it.
        for read in 0..2 {
            let got = read_blob(&sidecar.tcp_addr(), &digest).await;
            let got = got.unwrap_or_else(|f| panic!("{lie:?}, read {read}: {f:?}"));
            assert!(got == blob(), "{lie:?}, read {read}: wrong bytes");
        }
        drop((liar, honest));
        let again = read_blob(&sidecar.tcp_addr(), &digest).await;
        let again =
            again.unwrap_or_else(|f| panic!("{lie:?}, from memory: {f:?}\n{}", sidecar.log_text()));
        assert!(again == blob(), "{lie:?}: memory served wrong bytes");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_no_honest_tier_a_liar_gives_an_error_and_only_proven_bytes() {
    for &lie in &[
        Lie::FlipByte,
        Lie::WrongChunks,
        Lie::WrongOutboard,
        Lie::Truncate,
    ] {
        let liar = FaultPeer::start(lie);
        let near = tempfile::tempdir().unwrap();
        let sidecar = start_sidecar(near.path(), &liar.addr, None, "sync").await;
        let digest = B3Digest::of(&blob());
        let failure = read_blob(&sidecar.tcp_addr(), &digest)
            .await
            .expect_err("a liar's blob was served");
        // A sync fill streams what it proved to the client as it goes, so
        // the client may get the blob's first bytes before the lie shows;
        // never a byte that is not the blob's.
        assert!(
            failure.received < blob().len() && blob().starts_with(&failure.data),
            "{lie:?}: wrong bytes reached the client ({} of them): {:?}",
            failure.received,
            failure.status
        );
        assert_ne!(failure.code(), tonic::Code::Ok, "{lie:?}");
        assert!(
            !failure.status.message().contains("vanished"),
            "{lie:?}: the error should name the lie: {:?}",
            failure.status
        );
        // Asked again, the sidecar passes the liar over, and says so rather
        // than that the blob is absent.
        let again = read_blob(&sidecar.tcp_addr(), &digest)
            .await
            .expect_err("a liar's blob was served");
        assert_eq!(again.received, 0, "{lie:?}");
        assert_ne!(again.code(), tonic::Code::NotFound, "{lie:?}");
        assert!(
            again.status.message().contains("passed over"),
            "{lie:?}: {:?}",
            again.status
        );
        drop(sidecar);
        assert_near_tier_clean(near.path(), &digest, lie).await;
    }
}

/// A tier that lied about a blob is passed over for it on the next reads,
/// so they fill the near tier from the honest one. The liar's breaker
/// (default settings) stays closed through this: its own calls succeed.
#[tokio::test(flavor = "multi_thread")]
async fn a_liar_is_passed_over_and_the_near_tier_fills_from_an_honest_tier() {
    let (honest, digest) = honest_peer().await;
    for &lie in DATA_LIES {
        let liar = FaultPeer::start(lie);
        let near = tempfile::tempdir().unwrap();
        let sidecar =
            start_sidecar(near.path(), &liar.addr, Some(&honest.tcp_addr()), "sync").await;
        for read in 0..2 {
            let got = read_blob(&sidecar.tcp_addr(), &digest).await;
            let got = got.unwrap_or_else(|f| panic!("{lie:?}, read {read}: {f:?}"));
            assert!(got == blob(), "{lie:?}, read {read}: wrong bytes");
        }
        // The client has every byte before the fill has stored the index.
        let fills = "strata_tier_fills_total{tier=\"near\"}";
        assert!(
            eventually(Duration::from_secs(20), || metric(
                &sidecar.metrics(),
                fills
            ) >= 1.0)
            .await,
            "{lie:?}: no fill of the near tier:\n{}",
            sidecar.log_text()
        );
        let log = sidecar.log_text();
        assert_eq!(
            log.matches("passed over for it").count(),
            1,
            "{lie:?}: the liar is not passed over once:\n{log}"
        );
        drop(sidecar);
        assert_near_tier_clean(near.path(), &digest, lie).await;
        let disk = near_alone(near.path()).await;
        let filled = read_blob(&disk.tcp_addr(), &digest).await;
        let filled =
            filled.unwrap_or_else(|f| panic!("{lie:?}: the near tier was not filled: {f:?}"));
        assert!(filled == blob(), "{lie:?}: the near tier holds wrong bytes");
    }
}

/// A sidecar over a disk tier and a `race` of `liar` and `honest`, whose
/// honest member is asked only after a minute: the liar wins every race.
async fn start_racing_sidecar(near: &Path, liar: &str, honest: &str) -> Daemon {
    let config = format!(
        "[blobservices.near]\ntype = \"disk\"\npath = \"{}\"\nmax_size = \"1GiB\"\n\n\
         [blobservices.liar]\ntype = \"grpc\"\nurl = \"{liar}\"\n\n\
         [blobservices.honest]\ntype = \"grpc\"\nurl = \"{honest}\"\n\n\
         [blobservices.mirrors]\ntype = \"race\"\nmembers = [\"liar\", \"honest\"]\n\
         hedge_after = \"60s\"\n\n\
         [blobservices.root]\ntype = \"tiers\"\ntiers = [\"near\", \"mirrors\"]\n",
        near.display()
    );
    tokio::task::spawn_blocking(move || Daemon::start_with_metrics(Some(&config)))
        .await
        .unwrap()
}

/// That `sidecar` (from [`start_racing_sidecar`]) filled its near tier,
/// in `near`, with the blob, right, and with nothing the liar made up.
async fn assert_racing_sidecar_filled(sidecar: Daemon, near: &Path, digest: &B3Digest, lie: Lie) {
    assert!(
        eventually(Duration::from_secs(20), || metric(
            &sidecar.metrics(),
            "strata_tier_fills_total{tier=\"near\"}"
        ) >= 1.0)
        .await,
        "{lie:?}: no fill of the near tier:\n{}",
        sidecar.log_text()
    );
    drop(sidecar);
    assert_near_tier_clean(near, digest, lie).await;
    let disk = near_alone(near).await;
    let filled = read_blob(&disk.tcp_addr(), digest).await;
    assert!(
        filled.is_ok_and(|f| f == blob()),
        "{lie:?}: the near tier was not filled right"
    );
}

/// A `race` whose fast member lies in its data (the chunk list is right):
/// the chunk that fails its check is taken from the other member, the read
/// succeeds, the near tier fills with proven bytes only, and the liar is
/// passed over for the blob, inside the race (the engine in front never
/// sees the lie, so it keeps asking the race).
#[tokio::test(flavor = "multi_thread")]
async fn a_race_carries_on_from_its_honest_member_when_the_winner_lies() {
    let (honest, digest) = honest_peer().await;
    for &lie in &[Lie::FlipByte, Lie::FlipLast] {
        let liar = FaultPeer::start(lie);
        let near = tempfile::tempdir().unwrap();
        let sidecar = start_racing_sidecar(near.path(), &liar.addr, &honest.tcp_addr()).await;
        let got = read_blob(&sidecar.tcp_addr(), &digest).await;
        let got = got.unwrap_or_else(|f| panic!("{lie:?}: {f:?}\n{}", sidecar.log_text()));
        assert!(got == blob(), "{lie:?}: wrong bytes");
        let log = sidecar.log_text();
        assert!(
            log.contains("race member gave chunks of this blob that failed their check"),
            "{lie:?}: the liar is not passed over in the race:\n{log}"
        );
        assert_eq!(
            metric(
                &sidecar.metrics(),
                "strata_tier_verification_failures_total{tier=\"mirrors\"}"
            ),
            0.0,
            "{lie:?}: the engine blamed the race"
        );
        assert_racing_sidecar_filled(sidecar, near.path(), &digest, lie).await;
    }
}

/// When the winner's chunk list is the lie, no member has its chunks as
/// listed, so the stream of them fails; the race cannot tell whose lie
/// that is from the chunks (the honest member's fail against the liar's
/// list too) and blames no member for them. The engine in front tells the
/// race its list was caught lying: the race passes over the member whose
/// Stat gave it, the engine does not pass over the race, and asks it
/// again. The read succeeds from the honest member, and a second read
/// fills the near tier from it.
#[tokio::test(flavor = "multi_thread")]
async fn a_race_passes_over_the_member_whose_chunk_list_lied_and_is_asked_again() {
    let (honest, digest) = honest_peer().await;
    let liar = FaultPeer::start(Lie::ChunkSizes);
    let near = tempfile::tempdir().unwrap();
    let sidecar = start_racing_sidecar(near.path(), &liar.addr, &honest.tcp_addr()).await;
    let got = read_blob(&sidecar.tcp_addr(), &digest).await;
    let got = got.unwrap_or_else(|f| panic!("{f:?}\n{}", sidecar.log_text()));
    assert!(got == blob(), "wrong bytes");
    let log = sidecar.log_text();
    assert!(
        log.contains("asking the others for the rest"),
        "the race did not ask the honest member:\n{log}"
    );
    assert!(
        !log.contains("race member gave chunks of this blob that failed their check"),
        "a race member was blamed for its chunks:\n{log}"
    );
    let passed_over: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("chunk list of this blob was caught lying"))
        .collect();
    assert!(
        passed_over.len() == 1 && passed_over[0].contains("liar"),
        "not the liar alone passed over for its list:\n{log}"
    );
    assert!(
        !log.contains("the tier lied about this digest: passed over for it"),
        "the engine passed over the race:\n{log}"
    );

    // Asked again, the race answers from the honest member alone, and its
    // fill brings the blob into the near tier.
    let again = read_blob(&sidecar.tcp_addr(), &digest).await;
    assert!(again.is_ok_and(|b| b == blob()), "second read");
    assert_racing_sidecar_filled(sidecar, near.path(), &digest, Lie::ChunkSizes).await;
}

/// With `fill = "off"` the client's stream comes straight from the liar's
/// verifying reader; a lie caught part-way (or a stall, or a death, or
/// bytes past the blob's end) makes the sidecar continue the same stream
/// from the honest peer.
#[tokio::test(flavor = "multi_thread")]
async fn direct_reads_switch_tiers_part_way() {
    let (honest, digest) = honest_peer().await;
    for &lie in &[
        Lie::FlipLast,
        Lie::DieLast,
        Lie::FlipByte,
        Lie::Stall,
        Lie::Append,
    ] {
        let liar = FaultPeer::start(lie);
        let near = tempfile::tempdir().unwrap();
        let sidecar = start_sidecar(near.path(), &liar.addr, Some(&honest.tcp_addr()), "off").await;
        let got = read_blob(&sidecar.tcp_addr(), &digest).await;
        let got = got.unwrap_or_else(|f| panic!("{lie:?}: {f:?}\n{}", sidecar.log_text()));
        assert!(got == blob(), "{lie:?}: wrong bytes");
        let log = sidecar.log_text();
        let switch = log
            .lines()
            .find(|l| l.contains("liar") && l.contains("failed part-way"))
            .unwrap_or_else(|| panic!("{lie:?}: no switch logged:\n{log}"));
        if matches!(lie, Lie::FlipLast | Lie::DieLast) {
            // The liar's honest chunks went out before the switch.
            let position: u64 = switch
                .split("position=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("{lie:?}: no position in {switch}"));
            assert!(position > 0, "{lie:?}: switched before any byte: {switch}");
        }
        if lie == Lie::Append {
            // Every byte was proven; the bytes after them are the lie.
            assert!(
                switch.contains(&format!("position={SIZE}")),
                "{lie:?}: not caught at the blob's end: {switch}"
            );
        }
        assert!(
            log.contains("resuming the read from this tier"),
            "{lie:?}: no resumption logged:\n{log}"
        );
    }
}
