//! Malformed composition files fail with the file, the line and the tier.

use crate::harness::cli;

/// Runs `strata check` on `text`; returns (success, stdout, stderr).
fn check(text: &str) -> (bool, String, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site.toml");
    std::fs::write(&path, text).unwrap();
    let path = path.to_str().unwrap().to_owned();
    let out = cli(&["check", &path]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        path,
    )
}

fn assert_rejected(text: &str, line: usize, needles: &[&str]) {
    let (ok, _, stderr, path) = check(text);
    assert!(!ok, "accepted:\n{text}");
    let location = format!("{path}:{line}:");
    assert!(
        stderr.contains(&location),
        "expected {location:?} in {stderr:?}"
    );
    for needle in needles {
        assert!(stderr.contains(needle), "expected {needle:?} in {stderr:?}");
    }
}

#[test]
fn unknown_field_names_line_and_tier() {
    assert_rejected(
        "[blobservices.root]\ntype = \"memory\"\nmax_size = \"1MiB\"\ncolour = \"blue\"\n",
        4,
        &["tier `root`", "unknown field `colour`"],
    );
}

#[test]
fn unknown_kind() {
    assert_rejected(
        "[blobservices.root]\ntype = \"memry\"\n",
        2,
        &["tier `root`", "unknown type `memry`", "memory"],
    );
}

#[test]
fn missing_type() {
    assert_rejected(
        "\n[blobservices.root]\nmax_size = 5\n",
        2,
        &["missing `type`"],
    );
}

#[test]
fn bad_size() {
    assert_rejected(
        "[blobservices.root]\ntype = \"memory\"\nmax_size = \"lots\"\n",
        3,
        &["tier `root`", "invalid size"],
    );
}

#[test]
fn direct_io_takes_a_boolean() {
    assert_rejected(
        "[blobservices.root]\ntype = \"disk\"\npath = \"/tmp/x\"\ndirect_io = \"yes\"\n",
        4,
        &["tier `root`", "invalid type", "expected a boolean"],
    );
    let (ok, stdout, stderr, _) =
        check("[blobservices.root]\ntype = \"disk\"\npath = \"/tmp/x\"\ndirect_io = false\n");
    assert!(ok, "{stderr}");
    assert!(stdout.contains("direct_io = false"), "{stdout}");
    let (ok, stdout, stderr, _) =
        check("[blobservices.root]\ntype = \"disk\"\npath = \"/tmp/x\"\n");
    assert!(ok, "{stderr}");
    assert!(stdout.contains("direct_io = true"), "the default: {stdout}");
}

#[test]
fn bad_peer_url() {
    assert_rejected(
        "[blobservices.root]\ntype = \"grpc\"\n\nurl = \"http://nope:1\"\n",
        4,
        &["tier `root`", "grpc+http://"],
    );
}

#[test]
fn bad_protocol() {
    assert_rejected(
        "[blobservices.root]\ntype = \"grpc\"\nurl = \"grpc+http://127.0.0.1:1\"\nprotocol = \"nix\"\n",
        4,
        &["tier `root`", "nix"],
    );
}

#[test]
fn toml_syntax_error() {
    assert_rejected(
        "[blobservices.root]\ntype = \"memory\"\nmax_size = \n",
        3,
        &[],
    );
}

#[test]
fn unknown_top_level_table() {
    assert_rejected(
        "[blobservices.root]\ntype = \"memory\"\n[frobnicate]\nx = 1\n",
        3,
        &["unknown top-level key `frobnicate`"],
    );
}

#[test]
fn unknown_server_field() {
    assert_rejected(
        "[server]\nlisten = []\nbacklog = 3\n[blobservices.root]\ntype = \"memory\"\n",
        3,
        &["[server]", "unknown field `backlog`"],
    );
}

#[test]
fn missing_root() {
    let (ok, _, stderr, path) = check("[blobservices.cache]\ntype = \"memory\"\n");
    assert!(!ok);
    assert!(stderr.contains(&path), "{stderr}");
    assert!(stderr.contains("no tier named `root`"), "{stderr}");
}

/// Runs `strata serve` on `text`, which must make it fail; returns the
/// file's path and what it printed on stderr.
fn serve_failure(text: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let out = cli(&[
        "serve",
        "--config",
        path.to_str().unwrap(),
        "--listen",
        dir.path().join("s.sock").to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "served:\n{text}");
    (
        path.display().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn serve_refuses_a_bad_file_with_the_same_message() {
    let (path, stderr) = serve_failure("[blobservices.root]\ntype = \"memory\"\nsize = 1\n");
    assert!(
        stderr.contains(&format!("{path}:3:")) && stderr.contains("unknown field `size`"),
        "{stderr}"
    );
}

#[test]
fn snix_composition_with_other_services_is_accepted() {
    let text = r#"
[blobservices.root]
type = "grpc"
url = "grpc+unix:///run/snix/blobs.sock"

[directoryservices.root]
type = "memory"

[pathinfoservices.root]
type = "memory"
"#;
    let (ok, stdout, stderr, _) = check(text);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("root: grpc (url = grpc+unix:///run/snix/blobs.sock"),
        "{stdout}"
    );
    assert!(stderr.contains("ignoring"), "{stderr}");
}

#[test]
fn dangling_reference() {
    assert_rejected(
        "[blobservices.root]\ntype = \"tiers\"\ntiers = [\"mem\", \"disk\"]\n\n[blobservices.mem]\ntype = \"memory\"\n",
        1,
        &["tier `root`", "refers to `disk`, which is not defined"],
    );
}

#[test]
fn reference_cycle() {
    assert_rejected(
        "[blobservices.root]\ntype = \"tiers\"\ntiers = [\"a\"]\n\n[blobservices.a]\ntype = \"combined\"\nnear = \"root\"\nfar = \"b\"\n\n[blobservices.b]\ntype = \"memory\"\n",
        5,
        &["tier `a`", "reference cycle: a -> root -> a"],
    );
}

#[test]
fn bad_duration() {
    assert_rejected(
        "[blobservices.root]\ntype = \"memory\"\ntimeout = \"soon\"\n",
        3,
        &["tier `root`", "invalid duration"],
    );
}

#[test]
fn empty_tier_list() {
    assert_rejected(
        "\n[blobservices.root]\ntype = \"tiers\"\ntiers = []\n",
        2,
        &["tier `root`", "at least one tier"],
    );
}

#[test]
fn unknown_url_scheme() {
    assert_rejected(
        "[blobservices.root]\ntype = \"tiers\"\ntiers = [\"ftp://example.org/blobs\"]\n",
        1,
        &["tier `root`", "no tier kind handles the URL"],
    );
}

#[test]
fn url_references_make_anonymous_tiers() {
    let (ok, stdout, stderr, _) = check(
        "[blobservices.root]\ntype = \"tiers\"\ntiers = [\"memory://\", \"objectstore+file:///tmp/strata-x\", \"grpc+unix:///run/peer.sock\"]\n",
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("  memory://: memory"), "{stdout}");
    assert!(
        stdout
            .contains("objectstore+file:///tmp/strata-x: objectstore (url = file:///tmp/strata-x"),
        "{stdout}"
    );
    assert!(
        stdout.contains("grpc+unix:///run/peer.sock: grpc"),
        "{stdout}"
    );
}

#[test]
fn bad_socket_mode() {
    assert_rejected(
        "[server]\nsocket_mode = \"rw-rw----\"\n[blobservices.root]\ntype = \"memory\"\n",
        2,
        &["[server]", "octal mode"],
    );
}

/// Values that parse but would overflow what is made of them (a deadline,
/// a channel) are refused at start-up, not left to panic later.
#[test]
fn out_of_range_durations_and_queues() {
    assert_rejected(
        "[blobservices.root]\ntype = \"grpc\"\nurl = \"grpc+http://127.0.0.1:1\"\n\
         idle_timeout = \"10000000000000000000s\"\n",
        4,
        &["tier `root`", "longer than 100 years"],
    );
    assert_rejected(
        "[blobservices.root]\ntype = \"tiers\"\ntiers = [\"m\"]\nfill = \"async\"\n\
         fill_queue = 4611686018427387904\n\n[blobservices.m]\ntype = \"memory\"\n",
        1,
        &["tier `root`", "`fill_queue`"],
    );
}

/// Settings only building a tier can check (an object store URL's scheme,
/// a chunk size, a file to read) fail `serve` with the file, the line and
/// the tier too.
#[test]
fn serve_names_the_tier_a_build_fails_on() {
    let (path, stderr) = serve_failure(
        "[blobservices.near]\ntype = \"memory\"\n\n\
         [blobservices.root]\ntype = \"objectstore\"\nobject_store_url = \"memory:///\"\navg_chunk_size = 5\n",
    );
    assert!(
        stderr.contains(&format!("{path}:4: tier `root`:")) && stderr.contains("avg_chunk_size 5"),
        "{stderr}"
    );
}
