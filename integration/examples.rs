//! Every file in `composition-examples/` loads, builds and checks.

use strata::composition::{Composition, Registry};

use crate::harness::cli_ok;

const EXPECTED: [&str; 6] = [
    "fleet.toml",
    "memory.toml",
    "origin.toml",
    "peer.toml",
    "sidecar.toml",
    "snix-compat.toml",
];

#[tokio::test]
async fn every_example_loads_and_builds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("composition-examples");
    let scratch = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let graph = cli_ok(&["check", path.to_str().unwrap()]);
        assert!(graph.starts_with("root: "), "{name}: {graph}");

        // Build it for real, with its local directories moved somewhere
        // harmless (peers are connected lazily, S3 is not contacted).
        let text = std::fs::read_to_string(&path).unwrap();
        let local = scratch.path().join(&name);
        let text = text
            .replace("/var/cache/strata", local.join("cache").to_str().unwrap())
            .replace("/var/lib/snix-castore", local.join("lib").to_str().unwrap());
        std::fs::create_dir_all(local.join("lib/blobs")).unwrap();
        let composition = Composition::parse(&text, &name, &Registry::default())
            .unwrap_or_else(|e| panic!("{name} does not load: {e}"));
        composition
            .build()
            .await
            .unwrap_or_else(|e| panic!("{name} does not build: {e}"));
        seen.push(name);
    }
    seen.sort();
    assert_eq!(seen, EXPECTED);
}
