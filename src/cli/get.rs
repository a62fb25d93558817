//! `strata get`: download a blob, verified, to stdout or a file.
//!
//! The blob is streamed into a temporary file while it is hashed. Only once
//! it verified against the digest asked for is it renamed onto `-o FILE` (or
//! copied to stdout), so an error leaves neither a partial file nor partial
//! output behind.
//!
//! `--range A..B` reads bytes `A` up to (not including) `B` through strata's
//! own `grpc` client: from a server that lists chunks and sends an outboard
//! (strata), only the chunks covering the range's 16 KiB groups are fetched,
//! each checked against its digest and the outboard; from a stock server the
//! whole blob is fetched and verified first.

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

    /// Only bytes START up to END (exclusive); `START..` reads to the end.
    #[arg(long, value_name = "START..END", value_parser = parse_range)]
    range: Option<(u64, Option<u64>)>,
}

fn parse_range(s: &str) -> Result<(u64, Option<u64>), String> {
    let (start, end) = s
        .split_once("..")
        .ok_or_else(|| format!("`{s}` is not START..END"))?;
    let start: u64 = start
        .parse()
        .map_err(|e| format!("range start `{start}`: {e}"))?;
    let end = match end {
        "" => None,
        end => Some(end.parse().map_err(|e| format!("range end `{end}`: {e}"))?),
    };
    if end.is_some_and(|end| end < start) {
        return Err(format!("range `{s}` ends before it starts"));
    }
    Ok((start, end))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let digest = parse_digest(&args.digest)?;
    if let Some(range) = args.range {
        return run_range(&args, digest, range).await;
    }
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

    let (mut file, temp_path) = temp_file(args.output.as_deref())?;

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
    bar.finish_and_clear();
    deliver(file.into_inner(), temp_path, args.output.as_deref()).await
}

/// A buffered temporary file beside `output` (so it can be renamed onto
/// it), or in the temporary directory when writing to stdout.
fn temp_file(
    output: Option<&Path>,
) -> anyhow::Result<(tokio::io::BufWriter<tokio::fs::File>, tempfile::TempPath)> {
    let temp = match output {
        Some(out) => tempfile::NamedTempFile::new_in(parent_dir(out))
            .with_context(|| format!("creating a temporary file beside {}", out.display()))?,
        None => tempfile::NamedTempFile::new().context("creating a temporary file")?,
    };
    let (file, temp_path) = temp.into_parts();
    let file = tokio::io::BufWriter::with_capacity(1024 * 1024, tokio::fs::File::from_std(file));
    Ok((file, temp_path))
}

/// Moves the finished temporary file onto `output`, or copies it to stdout.
async fn deliver(
    mut file: tokio::fs::File,
    temp_path: tempfile::TempPath,
    output: Option<&Path>,
) -> anyhow::Result<()> {
    match output {
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

/// `get --range`: a verified range through the `grpc` tier's reader.
async fn run_range(
    args: &Args,
    digest: strata::B3Digest,
    (start, end): (u64, Option<u64>),
) -> anyhow::Result<()> {
    use strata::blobservice::BlobService;
    use tokio::io::AsyncReadExt;

    let addr = args.addr.resolve()?;
    let peer = strata::kinds::grpc::GrpcBlobService::with_options(
        addr.clone(),
        strata::kinds::grpc::Protocol::Snix,
        args.addr.peer_options()?,
    )?;
    let mut reader = peer
        .open_read(&digest)
        .await?
        .ok_or_else(|| anyhow::anyhow!("blob {digest} not found at {addr}"))?;
    let size = reader.len();
    let end = end.unwrap_or(size);
    if end > size {
        anyhow::bail!("range {start}..{end} runs past the end of the {size}-byte blob");
    }
    let (mut file, temp_path) = temp_file(args.output.as_deref())?;
    reader.seek(std::io::SeekFrom::Start(start)).await?;
    let copied = tokio::io::copy(&mut (&mut reader).take(end - start), &mut file)
        .await
        .map_err(strata::Error::from_io)?;
    if copied != end - start {
        anyhow::bail!(
            "blob {digest} ended after {copied} of {} bytes",
            end - start
        );
    }
    file.flush().await?;
    deliver(file.into_inner(), temp_path, args.output.as_deref()).await
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
