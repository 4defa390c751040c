#!/usr/bin/env bash
# The main job: one dpfl-server and 10 dpfl-client processes on 127.0.0.1 over QUIC with
# mutual TLS, Fashion-MNIST split IID across the clients, 10 rounds; prints the per-round
# test accuracy. Does all set-up itself (venv, data, certificates, release build).
#
#   scripts/run-main-job.sh                      # FedAvg, no DP
#   scripts/run-main-job.sh --dp central         # same federation with central DP
#   scripts/run-main-job.sh --dp local           # local DP (noise added on each node)
#   scripts/run-main-job.sh --pin                # each node pinned to one CPU (round-robin)
#   scripts/run-main-job.sh --dp distributed     # distributed DP: integer noise shares inside
#                                                # secure aggregation (the server sees the noisy sum)
#   scripts/run-main-job.sh --dp local --sampler grid   # fast fp-safe sampler instead of opendp
#   scripts/run-main-job.sh --set KEY=VALUE ...  # any server config override
#   scripts/run-main-job.sh --set 'http_listen="127.0.0.1:9464"'   # with the status page
set -euo pipefail
cd "$(dirname "$0")/.."
DP=none
SAMPLER=opendp
EXTRA=()
PIN=0
while (($#)); do
  case "$1" in
    --dp) DP="$2"; shift 2 ;;
    --pin) PIN=1; shift ;;
    --sampler) SAMPLER="$2"; shift 2 ;;
    --set) EXTRA+=(--set "$2"); shift 2 ;;
    *) echo "usage: $0 [--dp none|central|local|distributed] [--sampler opendp|grid] [--pin] [--set KEY=VALUE]..." >&2; exit 2 ;;
  esac
done
bash scripts/setup.sh
cargo build --release -q -p dpfl-server -p dpfl-client -p dpfl-certs
BIN=target/release
NODES=10
# One kit per host (certs-dev/server, certs-dev/node-N; the CA key apart in certs-dev/ca).
[ -f certs-dev/server/server.pem ] && [ -f "certs-dev/node-$NODES/node-$NODES.pem" ] ||
  "$BIN/dpfl-certs" init --out certs-dev --nodes "$NODES" --force
PORT="${PORT:-$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
OUT="runs/main-job-$DP"
rm -rf "$OUT"; mkdir -p "$OUT"
DPARGS=()
# The node owns its privacy: the server cannot lower a node's noise floor (default z = 1),
# so a node taking part in the demo's weak local DP has to lower it itself.
NODEARGS=()
case "$DP" in
  none) ;;
  # Every client every round (q = 1); noise and clipping chosen for 10 clients. With so
  # few clients DP costs accuracy; see the simulator's experiments for realistic scales.
  central) DPARGS=(--dp-mode central --noise-multiplier 0.3 --clip-norm 1.0 --sampling-rate 1.0)
           NODEARGS=(--min-noise-multiplier 0.3) ;;
  local) DPARGS=(--dp-mode local --noise-multiplier 0.05 --clip-norm 1.0 --sampling-rate 1.0)
         NODEARGS=(--min-noise-multiplier 0.05) ;;
  # Central's z and C, the noise added by the nodes: Skellam shares in Z/2^20 over the
  # complete graph of the 10 nodes, accounted over 8 contributors (t raised to 8).
  distributed) DPARGS=(--dp-mode distributed --noise-multiplier 0.3 --clip-norm 1.0 --sampling-rate 1.0
                 --set secure_aggregation=true --set secagg.bits=20 --set 'secagg.mechanism="skellam"'
                 --set secagg.degree=9 --set secagg.threshold=8
                 --set secagg.min_contributors=8 --set secagg.max_contributors=10)
               NODEARGS=(--min-noise-multiplier 0.3 --min-contributors 8) ;;
  *) echo "unknown --dp $DP" >&2; exit 2 ;;
esac
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
"$BIN/dpfl-server" --config configs/main-job.toml --listen "127.0.0.1:$PORT" --out "$OUT" --fresh \
  --set "noise_sampler=\"$SAMPLER\"" "${DPARGS[@]}" "${EXTRA[@]}" 2> >(tee "$OUT/server.log" | grep --line-buffered -E "round [0-9]+/[0-9]+:|finished|ERROR|WARN|privacy|status endpoint" >&2) &
server=$!
CPUS=$(nproc)
for i in $(seq 1 $NODES); do
  # --pin: node i trains on CPU (i - 1) mod nproc only, instead of migrating between cores.
  PINARGS=()
  if ((PIN)); then PINARGS=(--pin-cpus $(((i - 1) % CPUS))); fi
  "$BIN/dpfl-client" --server "127.0.0.1:$PORT" --certs "certs-dev/node-$i" --name "node-$i" \
    --data fashion-mnist --shard "$i/$NODES" --dp-mode "$DP" --sampler "$SAMPLER" --threads 1 \
    --log-file "$OUT/node-$i.jsonl" --privacy-state "$OUT/node-$i.privacy.json" "${NODEARGS[@]}" "${PINARGS[@]}" \
    >"$OUT/node-$i.log" 2>&1 &
  pids+=($!)
done
status=0
wait "$server" || status=$?
for p in "${pids[@]}"; do wait "$p" || status=$?; done
pids=()
echo
echo "round  test_accuracy  test_loss  epsilon  seconds"
# The operator's stream (operator/metrics.jsonl) has the timings; with DP on the public
# metrics.jsonl carries only what the guarantee covers.
jq -r '[.round, (.test_accuracy // "-"), (.test_loss // "-"), (.epsilon // "-"), .seconds] | @tsv' "$OUT/operator/metrics.jsonl" |
  awk -F'\t' '{ printf "%5s  %13.4f  %9.4f  %7s  %7.2f\n", $1, $2, $3, ($4 == "-" ? "-" : sprintf("%.3f", $4)), $5 }'
echo "outputs in $OUT (public: metrics.jsonl, ledger.json, summary.json, model.safetensors; operator/: full metrics and ledger; logs)"
exit $status
