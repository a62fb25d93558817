//! A `grpc` tier never passes on bytes that do not hash to the digest asked
//! for, whatever its peer sends.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use strata::B3Digest;
use strata::proto::snix::blob_service_server::{BlobService, BlobServiceServer};
use strata::proto::snix::{
    BlobChunk, PutBlobResponse, ReadBlobRequest, StatBlobRequest, StatBlobResponse,
};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use crate::harness::{Daemon, cli, read_blob, snix_client, test_data};

/// How the fake peer misbehaves.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Lie {
    /// Tells the truth (the control case).
    Honest,
    /// Like a stock snix daemon: no size in Stat, correct bytes.
    HonestStock,
    /// Flips one byte in the middle.
    FlipByte,
    /// Drops the last byte.
    Truncate,
    /// Appends bytes.
    Append,
    /// Like a stock snix daemon (no size), and flips a byte.
    StockFlipByte,
    /// Announces a different size in Stat, sends the right bytes.
    WrongSize,
    /// Serves a different blob's bytes under the digest.
    OtherBlob,
}

struct FakePeer {
    digest: B3Digest,
    data: Bytes,
    lie: Lie,
}

impl FakePeer {
    fn served(&self) -> Bytes {
        let mut d = self.data.to_vec();
        match self.lie {
            Lie::Honest | Lie::HonestStock | Lie::WrongSize => {}
            Lie::FlipByte | Lie::StockFlipByte => {
                let mid = d.len() / 2;
                d[mid] ^= 0x01;
            }
            Lie::Truncate => {
                d.pop();
            }
            Lie::Append => d.extend_from_slice(b"extra"),
            Lie::OtherBlob => d = test_data(d.len(), 999),
        }
        d.into()
    }
}

#[tonic::async_trait]
impl BlobService for FakePeer {
    async fn stat(
        &self,
        request: Request<StatBlobRequest>,
    ) -> Result<Response<StatBlobResponse>, Status> {
        if request.get_ref().digest.as_ref() != self.digest.as_bytes() {
            return Err(Status::not_found("no such blob"));
        }
        let size = match self.lie {
            Lie::HonestStock | Lie::StockFlipByte => 0,
            Lie::WrongSize => self.data.len() as u64 + 5,
            _ => self.data.len() as u64,
        };
        Ok(Response::new(StatBlobResponse {
            size,
            ..Default::default()
        }))
    }

    type ReadStream = futures::stream::BoxStream<'static, Result<BlobChunk, Status>>;

    async fn read(
        &self,
        request: Request<ReadBlobRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        if request.get_ref().digest.as_ref() != self.digest.as_bytes() {
            return Err(Status::not_found("no such blob"));
        }
        let served = self.served();
        let pieces: Vec<Result<BlobChunk, Status>> = (0..served.len())
            .step_by(64 * 1024)
            .map(|i| {
                Ok(BlobChunk {
                    data: served.slice(i..(i + 64 * 1024).min(served.len())),
                })
            })
            .collect();
        Ok(Response::new(futures::stream::iter(pieces).boxed()))
    }

    async fn put(
        &self,
        _request: Request<Streaming<BlobChunk>>,
    ) -> Result<Response<PutBlobResponse>, Status> {
        Err(Status::unimplemented("read-only fake"))
    }
}

/// Starts a fake peer on a loopback port; returns its address.
async fn start_fake(peer: FakePeer) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = BlobServiceServer::from_arc(Arc::new(peer));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    format!("grpc+http://{addr}")
}

async fn front_for(peer_addr: &str, protocol: &str) -> Daemon {
    let config = format!(
        "[blobservices.root]\ntype = \"grpc\"\nurl = \"{peer_addr}\"\nprotocol = \"{protocol}\"\n"
    );
    tokio::task::spawn_blocking(move || Daemon::start(Some(&config)))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn liars_are_refused_and_honest_peers_served() {
    // Larger than the in-memory spool, so the temporary-file path is covered too.
    for size in [100_000usize, 6 << 20] {
        let data = Bytes::from(test_data(size, size as u64));
        let digest = B3Digest::of(&data);
        for lie in [
            Lie::Honest,
            Lie::HonestStock,
            Lie::FlipByte,
            Lie::Truncate,
            Lie::Append,
            Lie::StockFlipByte,
            Lie::WrongSize,
            Lie::OtherBlob,
        ] {
            let peer = start_fake(FakePeer {
                digest,
                data: data.clone(),
                lie,
            })
            .await;
            let front = front_for(&peer, "snix").await;
            let result = read_blob(&front.tcp_addr(), &digest).await;
            let honest = matches!(lie, Lie::Honest | Lie::HonestStock);
            match result {
                Ok(got) => {
                    assert!(honest, "{lie:?}, {size} bytes: liar's data was served");
                    assert!(got == data, "{lie:?}: wrong bytes from an honest peer");
                }
                Err(failure) => {
                    assert!(!honest, "{lie:?}: {failure:?}");
                    assert_eq!(
                        failure.received, 0,
                        "{lie:?}: unverified bytes reached the client"
                    );
                }
            }

            // The CLI fails too, and leaves no file behind.
            let out_dir = tempfile::tempdir().unwrap();
            let out = out_dir.path().join("blob");
            let result = cli(&[
                "get",
                "--addr",
                &front.unix_addr(),
                &digest.to_hex(),
                "-o",
                out.to_str().unwrap(),
            ]);
            assert_eq!(result.status.success(), honest, "{lie:?}");
            if !honest {
                assert_eq!(std::fs::read_dir(out_dir.path()).unwrap().count(), 0);
                assert!(
                    front.log_text().contains("peer sent bad data")
                        || matches!(lie, Lie::WrongSize),
                    "{lie:?}: failure not logged:\n{}",
                    front.log_text()
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn strata_chains_to_a_strata_peer_in_both_protocols() {
    let peer = tokio::task::spawn_blocking(|| Daemon::start(None))
        .await
        .unwrap();
    for protocol in ["snix", "tvix"] {
        let front = front_for(&peer.unix_addr(), protocol).await;
        let data = test_data(3 << 20, 5);
        let digest = B3Digest::of(&data);

        // A put through the front lands on the peer.
        let pieces = vec![BlobChunk {
            data: Bytes::from(data.clone()),
        }];
        let put = snix_client(&front.tcp_addr())
            .put(futures::stream::iter(pieces))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(B3Digest::try_from(&put.digest).unwrap(), digest);
        let on_peer = read_blob(&peer.tcp_addr(), &digest).await.unwrap();
        assert!(on_peer == data, "{protocol}: not on the peer");

        // And reads through the front come back verified.
        let got = read_blob(&front.tcp_addr(), &digest).await.unwrap();
        assert!(got == data, "{protocol}: read through the front");
        let stat = snix_client(&front.tcp_addr())
            .stat(StatBlobRequest {
                digest: digest.into(),
                send_chunks: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stat.size, data.len() as u64);
        assert!(stat.chunks.len() > 1);
    }
}
