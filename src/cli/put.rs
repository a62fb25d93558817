//! `strata put`: upload files (or stdin) and print their digests.

use std::path::PathBuf;

use anyhow::Context;
use bytes::BytesMut;
use strata::blobservice::BlobService;
use strata::kinds::grpc::{GrpcBlobService, Protocol};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{AddrArg, progress};

/// Size of the pieces files are read and sent in.
const PIECE: usize = 1024 * 1024;

/// Arguments of `strata put`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    addr: AddrArg,

    /// Files to upload; `-` reads stdin.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let addr = args.addr.resolve()?;
    let service =
        GrpcBlobService::with_options(addr.clone(), Protocol::Snix, args.addr.peer_options()?)?;
    for file in &args.files {
        let name = file.display().to_string();
        let (reader, len): (Box<dyn AsyncRead + Unpin + Send>, Option<u64>) = if name == "-" {
            (Box::new(tokio::io::stdin()), None)
        } else {
            let f = tokio::fs::File::open(file)
                .await
                .with_context(|| format!("opening {name}"))?;
            let len = f.metadata().await.ok().map(|m| m.len());
            (Box::new(f), len)
        };
        let bar = progress(len, &name);
        let digest = upload(&service, reader, &bar)
            .await
            .with_context(|| format!("uploading {name} to {addr}"))?;
        bar.finish_and_clear();
        println!("{digest}  {name}");
    }
    Ok(())
}

async fn upload(
    service: &GrpcBlobService,
    mut reader: Box<dyn AsyncRead + Unpin + Send>,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<strata::B3Digest> {
    let mut writer = service.open_write().await?;
    loop {
        let mut buf = BytesMut::with_capacity(PIECE);
        while buf.len() < PIECE {
            if reader.read_buf(&mut buf).await? == 0 {
                break;
            }
        }
        if buf.is_empty() {
            break;
        }
        bar.inc(buf.len() as u64);
        writer.write(buf.freeze()).await?;
    }
    Ok(writer.close().await?.digest)
}
