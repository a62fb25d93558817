//! Every file in `composition-examples/` loads, builds and checks.

use strata::composition::Composition;

use crate::harness::cli_ok;

#[tokio::test]
async fn every_example_loads_and_builds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("composition-examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let composition = Composition::load(&path)
            .unwrap_or_else(|e| panic!("{} does not load: {e}", path.display()));
        composition
            .build()
            .await
            .unwrap_or_else(|e| panic!("{} does not build: {e}", path.display()));
        let graph = cli_ok(&["check", path.to_str().unwrap()]);
        assert!(graph.starts_with("root: "), "{}: {graph}", path.display());
        seen += 1;
    }
    assert!(seen >= 3, "only {seen} examples found");
}
