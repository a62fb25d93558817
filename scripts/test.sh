#!/usr/bin/env bash
# Runs strata's whole test suite: unit tests, integration tests that start
# real servers on loopback, and doc tests. Installs what the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --locked --all-targets "$@"
cargo test --locked --doc
