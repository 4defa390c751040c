#!/usr/bin/env bash
# Breast-cancer example as a real deployment (issue 15): one dpfl-server and three
# dpfl-client processes on 127.0.0.1 over QUIC with mutual TLS, each hospital with its own
# CSV file (label-skewed split of the 80 % training table), federated standardisation over
# QUIC before round 1 (configs/tabular-deploy.toml), then dpfl-predict on the final model
# (which carries the agreed transform) and the held-out 20 %.
#
#   scripts/tabular-deploy.sh              # no DP: exact statistics
#   scripts/tabular-deploy.sh --dp central # central DP: statistics released with z = 3
#                                          # (ledger round 0), then DP-FedAvg z = 0.5, C = 0.1
set -euo pipefail
cd "$(dirname "$0")/.."
DP=none
while (($#)); do
  case "$1" in
    --dp) DP="$2"; shift 2 ;;
    *) echo "usage: $0 [--dp none|central]" >&2; exit 2 ;;
  esac
done
bash scripts/setup.sh >/dev/null
cargo build --release -q -p dpfl-server -p dpfl-client -p dpfl-certs
BIN=target/release
DATA=runs/tabular-example
[ -f "$DATA/train.csv" ] || .venv/bin/python examples/tabular/prepare.py "$DATA" >/dev/null
OUT="runs/tabular-deploy-$DP"
rm -rf "$OUT"; mkdir -p "$OUT"
# Three hospitals of different sizes, label-skewed: per class, Dirichlet(0.5) shares
# (seed 7), redrawn until every hospital holds at least 40 rows.
.venv/bin/python - "$DATA/train.csv" "$OUT" <<'PY'
import sys, numpy as np
src, out = sys.argv[1], sys.argv[2]
with open(src) as f:
    f.readline()
    rows = [l for l in f if l.strip()]
y = np.array([int(r.rsplit(",", 1)[1]) for r in rows])
rng = np.random.default_rng(7)
while True:
    parts = [[], [], []]
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = (np.cumsum(rng.dirichlet([0.5] * 3))[:-1] * len(idx)).astype(int)
        for h, chunk in enumerate(np.split(idx, cuts)):
            parts[h] += chunk.tolist()
    if min(len(p) for p in parts) >= 40:
        break
for h, p in enumerate(parts, 1):
    with open(f"{out}/hospital-{h}.csv", "w") as f:
        f.write(f"{len(p)},30,malignant,benign\n")
        f.writelines(rows[i] for i in sorted(p))
    print(f"hospital-{h}: {len(p)} rows, {int(y[p].sum())} benign")
PY
"$BIN/dpfl-certs" init --out "$OUT/certs" --nodes 3 --force >/dev/null
PORT="$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
OPTS="skip=1,header=no,classes=malignant|benign"
DPARGS=()
NODEARGS=()
if [ "$DP" = central ]; then
  DPARGS=(--dp-mode central --noise-multiplier 0.5 --clip-norm 0.1 --sampling-rate 1.0
          --set standardize.noise_multiplier=3.0)
  NODEARGS=(--min-noise-multiplier 0.5)
elif [ "$DP" != none ]; then
  echo "unknown --dp $DP" >&2; exit 2
fi
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
"$BIN/dpfl-server" --config configs/tabular-deploy.toml --certs "$OUT/certs/server" \
  --listen "127.0.0.1:$PORT" --out "$OUT/server" --fresh \
  --test-data "csv:$DATA/test.csv,$OPTS" "${DPARGS[@]}" \
  2> >(tee "$OUT/server.log" | grep --line-buffered -E "standardisation agreed|statistics released|round (1|10|20|30|40)/40:|finished|ERROR" >&2) &
server=$!
for h in 1 2 3; do
  "$BIN/dpfl-client" --server "127.0.0.1:$PORT" --certs "$OUT/certs/node-$h" --name "node-$h" \
    --data "csv:$OUT/hospital-$h.csv,$OPTS" --dp-mode "$DP" --threads 1 \
    --privacy-state "$OUT/node-$h.privacy.json" "${NODEARGS[@]}" >"$OUT/node-$h.log" 2>&1 &
  pids+=($!)
done
wait "$server"
echo "== dpfl-predict on the held-out test file (the model file carries the transform)"
"$BIN/dpfl-predict" --model "$OUT/server/model.safetensors" --data "csv:$DATA/test.csv,$OPTS" \
  --out "$OUT/predictions.csv" --metrics-json "$OUT/scores.json"
if [ "$DP" != none ]; then
  echo "== ledger (round 0: the statistics release)"
  cat "$OUT/server/ledger.json"
fi
