//! `strata stat`: what the server knows about a blob.

use strata::proto::snix::StatBlobRequest;

use super::{AddrArg, parse_digest};

/// Arguments of `strata stat`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    addr: AddrArg,

    /// The blob's digest (hex or blake3-<base64>).
    digest: String,

    /// List the blob's physical chunks.
    #[arg(long)]
    chunks: bool,

    /// Ask for the blob's bao outboard.
    #[arg(long)]
    bao: bool,

    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let digest = parse_digest(&args.digest)?;
    let (addr, mut client) = args.addr.client()?;
    let resp = client
        .stat(StatBlobRequest {
            digest: digest.into(),
            send_chunks: args.chunks,
            send_bao: args.bao,
            bao_shift: 4,
            inline_max_size: 0,
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::NotFound => anyhow::anyhow!("blob {digest} not found at {addr}"),
            _ => anyhow::anyhow!("{addr}: {}: {}", s.code(), s.message()),
        })?
        .into_inner();

    let chunks: Vec<(String, u64)> = resp
        .chunks
        .iter()
        .map(|c| {
            let d = strata::B3Digest::try_from(&c.digest)
                .map(|d| d.to_hex())
                .unwrap_or_else(|_| format!("<invalid: {} bytes>", c.digest.len()));
            (d, c.size)
        })
        .collect();
    if args.json {
        let mut obj = serde_json::json!({
            "digest": digest.to_hex(),
            "size": resp.size,
        });
        if args.chunks {
            obj["chunks"] = chunks
                .iter()
                .map(|(d, s)| serde_json::json!({"digest": d, "size": s}))
                .collect();
        }
        if args.bao {
            obj["bao_shift"] = resp.bao_shift.into();
            obj["bao"] = data_encoding::HEXLOWER.encode(&resp.bao).into();
        }
        println!("{obj}");
    } else {
        println!("digest: {digest}");
        println!("size: {}", resp.size);
        if args.chunks {
            println!("chunks: {}", chunks.len());
            for (d, s) in &chunks {
                println!("  {d}  {s}");
            }
        }
        if args.bao {
            println!("bao_shift: {}", resp.bao_shift);
            println!("bao: {} bytes", resp.bao.len());
        }
    }
    Ok(())
}
