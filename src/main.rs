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

fn main() -> std::process::ExitCode {
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
