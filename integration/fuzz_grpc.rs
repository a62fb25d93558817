//! Property tests of the gRPC request paths: a real tonic client against
//! strata's server (`strata::server::serve`, with its message limits) over a
//! memory tier, in this process, on a unix socket. Arbitrary digests, Stat
//! options and Put streams get an answer that is OK or a status that says
//! what was wrong with the request; never a panic, never an internal error;
//! and a Put always answers with the BLAKE3 of the bytes sent, which then
//! read back exactly.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use proptest::prelude::*;
use strata::B3Digest;
use strata::addr::ListenAddr;
use strata::chunkstore::ChunkedBlobService;
use strata::kinds::memory::MemoryStore;
use strata::proto::snix::{BlobChunk, ReadBlobRequest, StatBlobRequest, StatBlobResponse};
use strata::server::{DEFAULT_MAX_INLINE_SIZE, ServeOptions, serve};
use strata::verify::Outboard;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::harness::{fuzz_config, snix_client, test_data, tvix_client};

/// One server for every case of every test in this file.
struct Fixture {
    rt: tokio::runtime::Runtime,
    addr: String,
    /// Blobs put before any case runs: empty, one byte, one chunk, several
    /// chunks, and one above the server's inline limit.
    known: Vec<(B3Digest, Vec<u8>)>,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let socket: PathBuf = dir.path().join("fuzz.sock");
        let service = Arc::new(ChunkedBlobService::new(MemoryStore::new(256 << 20)));
        let opts = ServeOptions {
            listen: vec![ListenAddr::Unix(socket.clone())],
            ..ServeOptions::default()
        };
        rt.spawn(async move {
            serve(service, opts, CancellationToken::new())
                .await
                .expect("in-process server")
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "in-process server did not listen"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let addr = format!("grpc+unix://{}", socket.display());
        let known = rt.block_on(async {
            let mut known = Vec::new();
            for (len, seed) in [
                (0usize, 0u64),
                (1, 1),
                (20_000, 2),
                (1_600_000, 3),
                (DEFAULT_MAX_INLINE_SIZE as usize + 1, 4),
            ] {
                let data = test_data(len, seed);
                let digest = put(&addr, false, vec![Bytes::from(data.clone())])
                    .await
                    .expect("seed put");
                assert_eq!(digest, B3Digest::of(&data));
                known.push((digest, data));
            }
            known
        });
        Fixture {
            rt,
            addr,
            known,
            _dir: dir,
        }
    })
}

async fn stat(addr: &str, tvix: bool, req: StatBlobRequest) -> Result<StatBlobResponse, Status> {
    let resp = if tvix {
        tvix_client(addr).stat(req).await
    } else {
        snix_client(addr).stat(req).await
    };
    resp.map(tonic::Response::into_inner)
}

/// All the bytes of a Read, or the status it (or its stream) ended with.
async fn read(addr: &str, tvix: bool, digest: Bytes) -> Result<Vec<u8>, Status> {
    let req = ReadBlobRequest { digest };
    let mut stream = if tvix {
        tvix_client(addr).read(req).await?.into_inner()
    } else {
        snix_client(addr).read(req).await?.into_inner()
    };
    let mut out = Vec::new();
    while let Some(msg) = stream.next().await {
        out.extend_from_slice(&msg?.data);
    }
    Ok(out)
}

async fn put(addr: &str, tvix: bool, pieces: Vec<Bytes>) -> Result<B3Digest, Status> {
    let msgs = futures::stream::iter(pieces.into_iter().map(|data| BlobChunk { data }));
    let resp = if tvix {
        tvix_client(addr).put(msgs).await?
    } else {
        snix_client(addr).put(msgs).await?
    };
    B3Digest::try_from(&resp.into_inner().digest)
        .map_err(|e| Status::internal(format!("bad digest in the Put response: {e}")))
}

/// What a request names: a seeded blob, a well-formed unknown digest, or
/// bytes of any length.
#[derive(Debug, Clone)]
enum Target {
    Known(usize),
    Unknown([u8; 32]),
    Raw(Vec<u8>),
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        3 => (0usize..5).prop_map(Target::Known),
        1 => any::<[u8; 32]>().prop_map(Target::Unknown),
        2 => prop::collection::vec(any::<u8>(), 0..70)
            .prop_filter("not a digest", |v| v.len() != 32)
            .prop_map(Target::Raw),
    ]
}

impl Target {
    /// The digest bytes to send, and the blob they name if it is known.
    fn resolve(&self, fx: &Fixture) -> (Bytes, Option<(B3Digest, Vec<u8>)>) {
        match self {
            Target::Known(i) => {
                let (d, data) = &fx.known[*i];
                ((*d).into(), Some((*d, data.clone())))
            }
            Target::Unknown(raw) => (Bytes::copy_from_slice(raw), None),
            Target::Raw(raw) => (Bytes::copy_from_slice(raw), None),
        }
    }
}

/// The status a request about `digest` may fail with when the blob is not
/// known: INVALID_ARGUMENT for a digest that is not 32 bytes, else
/// NOT_FOUND.
fn expected_miss(digest: &[u8]) -> Code {
    if digest.len() == 32 {
        Code::NotFound
    } else {
        Code::InvalidArgument
    }
}

proptest! {
    #![proptest_config(fuzz_config(128))]

    #[test]
    fn stat_answers_ok_or_a_sensible_status(
        target in target(),
        send_chunks in any::<bool>(),
        send_bao in any::<bool>(),
        bao_shift in prop_oneof![0u32..8, 0u32..40, any::<u32>()],
        inline_max_size in prop_oneof![Just(0u64), 0u64..(3 << 20), any::<u64>()],
        tvix in any::<bool>(),
    ) {
        let fx = fixture();
        let (digest, known) = target.resolve(fx);
        let req = StatBlobRequest {
            digest: digest.clone(),
            send_chunks,
            send_bao,
            bao_shift,
            inline_max_size,
        };
        let answer = fx.rt.block_on(stat(&fx.addr, tvix, req));
        let Some((blob, data)) = known else {
            let status = answer.expect_err("a Stat of an unknown digest succeeded");
            prop_assert_eq!(status.code(), expected_miss(&digest), "{}", status);
            return Ok(());
        };
        let resp = answer.map_err(|s| TestCaseError::fail(format!("Stat of a known blob: {s}")))?;
        let size = data.len() as u64;
        prop_assert_eq!(resp.size, size);

        let inline = size > 0 && size <= inline_max_size.min(DEFAULT_MAX_INLINE_SIZE);
        if inline {
            prop_assert!(resp.inline_data == data, "inline data differs");
        } else {
            prop_assert!(resp.inline_data.is_empty(), "inlined past the limit");
        }

        if send_chunks {
            let listed: u64 = resp.chunks.iter().map(|c| c.size).sum();
            prop_assert!(resp.chunks.is_empty() || listed == size, "chunks add up to {}", listed);
            // Every listed chunk can be read, and is the slice it claims.
            let mut offset = 0usize;
            for c in &resp.chunks {
                let len = usize::try_from(c.size).expect("chunk size");
                let got = fx.rt.block_on(read(&fx.addr, tvix, c.digest.clone()))
                    .map_err(|s| TestCaseError::fail(format!("Read of a listed chunk: {s}")))?;
                prop_assert!(got[..] == data[offset..offset + len], "chunk at {} differs", offset);
                offset += len;
            }
        } else {
            prop_assert!(resp.chunks.is_empty(), "chunks sent unasked");
        }

        if send_bao {
            let shift = u8::try_from(resp.bao_shift).expect("bao_shift fits a byte");
            prop_assert!(
                u32::from(shift) >= bao_shift.min(u32::from(strata::verify::bao::MAX_SHIFT)),
                "bao at shift {} for a request of {}", shift, bao_shift
            );
            // The outboard sent must hash up to the digest asked about.
            if let Err(e) = Outboard::verify(blob, size, shift, resp.bao.clone()) {
                return Err(TestCaseError::fail(format!("outboard does not verify: {e}")));
            }
        } else {
            prop_assert!(resp.bao.is_empty(), "bao sent unasked");
        }
    }

    #[test]
    fn read_answers_the_blob_or_a_sensible_status(target in target(), tvix in any::<bool>()) {
        let fx = fixture();
        let (digest, known) = target.resolve(fx);
        let answer = fx.rt.block_on(read(&fx.addr, tvix, digest.clone()));
        match known {
            Some((_, data)) => {
                let got = answer.map_err(|s| TestCaseError::fail(format!("Read of a known blob: {s}")))?;
                prop_assert!(got == data, "read {} bytes of a {}-byte blob", got.len(), data.len());
            }
            None => {
                let status = answer.expect_err("a Read of an unknown digest succeeded");
                prop_assert_eq!(status.code(), expected_miss(&digest), "{}", status);
            }
        }
    }
}

/// Put streams: up to a dozen messages of any size up to 384 KiB, empty
/// ones included, sometimes all cut from one run of bytes so that chunk
/// boundaries and message boundaries interleave.
fn put_stream() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let piece = prop_oneof![
        2 => Just(Vec::new()),
        3 => prop::collection::vec(any::<u8>(), 1..64),
        2 => (1usize..(384 << 10), any::<u64>()).prop_map(|(n, seed)| test_data(n, seed)),
    ];
    prop::collection::vec(piece, 0..12)
}

proptest! {
    #![proptest_config(fuzz_config(64))]

    #[test]
    fn put_returns_the_digest_of_the_bytes_and_reads_back(
        pieces in put_stream(),
        tvix_put in any::<bool>(),
        tvix_read in any::<bool>(),
    ) {
        let fx = fixture();
        let whole: Vec<u8> = pieces.concat();
        let expected = B3Digest::of(&whole);
        let pieces: Vec<Bytes> = pieces.into_iter().map(Bytes::from).collect();
        let digest = fx.rt.block_on(put(&fx.addr, tvix_put, pieces))
            .map_err(|s| TestCaseError::fail(format!("Put failed: {s}")))?;
        prop_assert_eq!(digest, expected);
        let got = fx.rt.block_on(read(&fx.addr, tvix_read, digest.into()))
            .map_err(|s| TestCaseError::fail(format!("Read after Put: {s}")))?;
        prop_assert!(got == whole, "read back {} bytes of {}", got.len(), whole.len());
        let resp = fx.rt.block_on(stat(&fx.addr, tvix_read, StatBlobRequest {
            digest: digest.into(),
            ..Default::default()
        })).map_err(|s| TestCaseError::fail(format!("Stat after Put: {s}")))?;
        prop_assert_eq!(resp.size, whole.len() as u64);
    }
}

/// A Put message above the server's message limit is refused with a
/// status about size, and the server goes on serving.
#[test]
fn oversized_put_message_is_refused() {
    let fx = fixture();
    let big = Bytes::from(test_data(5 << 20, 9));
    let status = fx
        .rt
        .block_on(put(&fx.addr, false, vec![Bytes::from_static(b"x"), big]))
        .expect_err("a 5 MiB message was accepted");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status}"
    );
    let (digest, data) = &fx.known[3];
    let got = fx
        .rt
        .block_on(read(&fx.addr, false, (*digest).into()))
        .expect("read after the refused Put");
    assert!(got == *data);
}
