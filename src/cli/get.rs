//! `strata get`: download a blob, verified, to stdout or a file.
//!
//! The blob is streamed into a temporary file while it is hashed. Only once
//! it verified against the digest asked for is it renamed onto `-o FILE` (or
//! copied to stdout), so an error leaves neither a partial file nor partial
//! output behind.

use std::path::{Path, PathBuf};

use anyhow::Context;
use futures::StreamExt;
use strata::proto::snix::{ReadBlobRequest, StatBlobRequest};
use strata::verify::StreamVerifier;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::{AddrArg, parse_digest, progress};

/// Arguments of `strata get`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    addr: AddrArg,

    /// The blob's digest (hex or blake3-<base64>).
    digest: String,

    /// Write to FILE instead of stdout.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let digest = parse_digest(&args.digest)?;
    let (addr, mut client) = args.addr.client()?;

    let stat = client
        .stat(StatBlobRequest {
            digest: digest.into(),
            ..Default::default()
        })
        .await
        .map_err(|s| status_error(&addr, &digest, s))?
        .into_inner();
    // strata always reports the size; a stock snix server may not.
    let expected_len = (stat.size != 0 || digest.is_empty_blob()).then_some(stat.size);

    let temp = match &args.output {
        Some(out) => tempfile::NamedTempFile::new_in(parent_dir(out))
            .with_context(|| format!("creating a temporary file beside {}", out.display()))?,
        None => tempfile::NamedTempFile::new().context("creating a temporary file")?,
    };
    let (file, temp_path) = temp.into_parts();
    let mut file =
        tokio::io::BufWriter::with_capacity(1024 * 1024, tokio::fs::File::from_std(file));

    let bar = progress(expected_len, &digest.to_hex()[..12]);
    let mut verifier = StreamVerifier::new(digest, expected_len);
    let mut stream = client
        .read(ReadBlobRequest {
            digest: digest.into(),
        })
        .await
        .map_err(|s| status_error(&addr, &digest, s))?
        .into_inner();
    while let Some(msg) = stream.next().await {
        let msg = msg.map_err(|s| status_error(&addr, &digest, s))?;
        verifier.update(&msg.data)?;
        file.write_all(&msg.data).await?;
        bar.inc(msg.data.len() as u64);
    }
    verifier.finish()?;
    file.flush().await?;
    let mut file = file.into_inner();
    bar.finish_and_clear();

    match &args.output {
        Some(out) => {
            file.sync_all().await?;
            drop(file);
            temp_path
                .persist(out)
                .with_context(|| format!("writing {}", out.display()))?;
        }
        None => {
            file.seek(std::io::SeekFrom::Start(0)).await?;
            let mut stdout = tokio::io::stdout();
            tokio::io::copy(&mut file, &mut stdout).await?;
            stdout.flush().await?;
        }
    }
    Ok(())
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn status_error(
    addr: &strata::addr::PeerAddr,
    digest: &strata::B3Digest,
    status: tonic::Status,
) -> anyhow::Error {
    if status.code() == tonic::Code::NotFound {
        anyhow::anyhow!("blob {digest} not found at {addr}")
    } else {
        anyhow::anyhow!("{addr}: {}: {}", status.code(), status.message())
    }
}
