#!/usr/bin/env bash
# Runs strata's whole test suite: unit tests, integration tests that start
# real servers on loopback (strata daemons, lying peers, an S3 server), and
# doc tests. Installs what the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

# A real S3 server for the objectstore tests. 0.14.1 is the newest s3s-fs
# that builds with this machine's rustc.
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
export PATH="$cargo_bin:$PATH"
if ! command -v s3s-fs >/dev/null 2>&1; then
    echo "installing s3s-fs 0.14.1 (S3 server for the tests)..." >&2
    cargo install s3s-fs --version 0.14.1 --features binary --locked
fi

cargo test --locked --all-targets "$@"
cargo test --locked --doc
