//! `strata check`: validate a composition file and print its tier graph.

use std::path::PathBuf;

use strata::composition::Composition;

/// Arguments of `strata check`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The composition file to check; without it, the embedded default.
    file: Option<PathBuf>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let composition = match &args.file {
        Some(file) => Composition::load(file)?,
        None => Composition::default_composition()?,
    };
    print!("{}", composition.describe());
    if !composition.server.listen.is_empty() {
        println!("listen: {}", composition.server.listen.join(", "));
    }
    Ok(())
}
