#!/usr/bin/env bash
# The whole test suite: set-up, then every unit and end-to-end test of the workspace in
# the release profile (the same profile as the binaries, so libtorch's shim and opendp
# compile once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --release --workspace "$@"
