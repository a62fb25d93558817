//! `strata`: the command-line front end. Each subcommand lives in
//! `src/cli/`; all real work happens in the library.

mod cli;

use clap::{Parser, Subcommand, ValueEnum};

/// strata: a layered, verifying, caching substituter for BLAKE3-addressed
/// blobs, speaking the snix/tvix castore BlobService protocol.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the BlobService daemon.
    Serve(cli::serve::Args),
    /// Upload files; prints `<digest>  <name>` for each.
    Put(cli::put::Args),
    /// Download a blob to stdout or a file.
    Get(cli::get::Args),
    /// Show a blob's size, chunks and outboard.
    Stat(cli::stat::Args),
    /// Validate a composition file and print its tier graph.
    Check(cli::check::Args),
    /// Benchmark put, reads, Stat and coalescing against BLAKE3 and raw gRPC.
    Bench(cli::bench::Args),
}

/// Keeps glibc from handing large buffers back to the kernel between uses.
///
/// HTTP/2 moves data in frames of up to 1 MiB, each read into or encoded in
/// a fresh buffer that is freed once its bytes are sent or stored. With
/// glibc's defaults, buffers that size are mapped and unmapped each time,
/// or the heap is trimmed under them, so every 4 KiB of a transfer is a
/// page fault and a page cleared. Buffers below 4 MiB now come from the
/// heap, and up to 16 MiB of free memory stays with it. In `strata bench`
/// this raised the raw tonic streams by 15–95%, Put by about 5% and an
/// unfilled verified read by 10–25%, for a few MB more peak RSS
/// (`docs/benchmarks.md`). An operator's own `glibc.malloc` settings in
/// `GLIBC_TUNABLES` are left to apply instead.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if !std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
        // SAFETY: mallopt only sets allocator parameters; it is called
        // before any other thread exists.
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20) == 1
        };
        if !ok {
            eprintln!("strata: could not tune the allocator; continuing with its defaults");
        }
    }
}

fn main() -> std::process::ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    cli::init_tracing(default_level, matches!(cli.log_format, LogFormat::Json));

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("strata: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => cli::serve::run(args).await,
            Command::Put(args) => cli::put::run(args).await,
            Command::Get(args) => cli::get::run(args).await,
            Command::Stat(args) => cli::stat::run(args).await,
            Command::Check(args) => cli::check::run(args).await,
            Command::Bench(args) => cli::bench::run_cli(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
