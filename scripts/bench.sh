#!/usr/bin/env bash
# Benchmarks every stage of a round against its baseline and prints one table; the same
# figures go to results/bench.json. Does its own set-up like the other scripts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p dpfl-bench -p dpfl-server -p dpfl-client -p dpfl-certs
DPFL_ROOT="$PWD" target/release/dpfl-bench "$@"
