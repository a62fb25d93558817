//! Test fronts: in-process gRPC servers that stand in for a peer. A
//! [`Front`] forwards Stat and Read to a real upstream daemon and lets a
//! test hang, hold back or reshape them through [`FrontHooks`].

use std::net::SocketAddr;

use futures::stream::BoxStream;
use strata::proto::snix::blob_service_client::BlobServiceClient;
use strata::proto::snix::blob_service_server::{BlobService, BlobServiceServer};
use strata::proto::snix::{
    BlobChunk, PutBlobResponse, ReadBlobRequest, StatBlobRequest, StatBlobResponse,
};
use tonic::transport::Channel;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use crate::harness::snix_client;

/// A Read response stream.
pub type ReadStream = BoxStream<'static, Result<BlobChunk, Status>>;

/// What a [`Front`] does to the calls it forwards. Every hook defaults to
/// plain forwarding.
#[tonic::async_trait]
pub trait FrontHooks: Send + Sync + 'static {
    /// Runs before a Stat or Read (`method`) of `digest` goes upstream; an
    /// error is the answer instead.
    async fn before(&self, method: &'static str, digest: &[u8]) -> Result<(), Status> {
        let _ = (method, digest);
        Ok(())
    }

    /// Sees (and may reshape) each Stat answer before the client does.
    fn stat_answer(&self, answer: &mut StatBlobResponse) {
        let _ = answer;
    }

    /// The Read stream the client gets for `digest`, made from the
    /// upstream's.
    fn read_stream(&self, digest: &[u8], upstream: ReadStream) -> ReadStream {
        let _ = digest;
        upstream
    }
}

/// Forwards Stat and Read to `upstream` through `hooks`; refuses Puts.
pub struct Front<H> {
    upstream: BlobServiceClient<Channel>,
    hooks: H,
}

#[tonic::async_trait]
impl<H: FrontHooks> BlobService for Front<H> {
    async fn stat(
        &self,
        request: Request<StatBlobRequest>,
    ) -> Result<Response<StatBlobResponse>, Status> {
        let request = request.into_inner();
        self.hooks.before("stat", &request.digest).await?;
        let mut answer = self.upstream.clone().stat(request).await?;
        self.hooks.stat_answer(answer.get_mut());
        Ok(answer)
    }

    type ReadStream = ReadStream;

    async fn read(
        &self,
        request: Request<ReadBlobRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let request = request.into_inner();
        self.hooks.before("read", &request.digest).await?;
        let digest = request.digest.clone();
        let upstream = self.upstream.clone().read(request).await?.into_inner();
        Ok(Response::new(
            self.hooks.read_stream(&digest, Box::pin(upstream)),
        ))
    }

    async fn put(
        &self,
        _request: Request<Streaming<BlobChunk>>,
    ) -> Result<Response<PutBlobResponse>, Status> {
        Err(Status::unimplemented("read-only front"))
    }
}

/// Serves `service` on a fresh loopback port; returns the port's address.
pub async fn serve<S: BlobService>(service: S) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(BlobServiceServer::new(service))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    addr
}

/// Serves a [`Front`] over the daemon at `upstream` (a `grpc+http://`
/// address); returns the front's `grpc+http://` address.
pub async fn serve_front<H: FrontHooks>(upstream: &str, hooks: H) -> String {
    let front = Front {
        upstream: snix_client(upstream),
        hooks,
    };
    format!("grpc+http://{}", serve(front).await)
}
