#!/usr/bin/env bash
# Breast-cancer example (issue 15): split scikit-learn's copy of the Wisconsin table,
# measure the centralised baselines, federate it across three hospitals over real QUIC
# nodes on 127.0.0.1 (configs/tabular-example.toml: with and without DP), and score each
# final model with dpfl-predict on the held-out 20 %.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh >/dev/null
cargo build --release -q -p dpfl-sim -p dpfl-client --bins
OUT=runs/tabular-example
mkdir -p "$OUT"
echo "== centralised baselines (pooled training table, standardised)"
.venv/bin/python examples/tabular/prepare.py "$OUT" | tee "$OUT/baselines.jsonl"
echo "== federated: three hospitals, Dirichlet(0.5) label skew, 30-16-16-2 MLP"
target/release/dpfl-sim configs/tabular-example.toml --out "$OUT/results" "$@"
dir="$OUT/results/tabular-example"
cat "$dir/summary.csv"
for m in "$dir"/c*.model.safetensors; do
  id="$(basename "$m" .model.safetensors)"
  echo "== $id: dpfl-predict on the held-out test file"
  target/release/dpfl-predict --model "$m" \
    --data "csv:$OUT/test.csv,skip=1,header=no,classes=malignant|benign" \
    --out "$dir/$id.predictions.csv" --metrics-json "$dir/$id.scores.json"
  if [ -f "$dir/$id.standardize.json" ]; then
    echo "standardisation release (per row): $(cat "$dir/$id.standardize.json")"
  fi
done
