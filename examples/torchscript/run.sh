#!/usr/bin/env bash
# Federates a PyTorch module over QUIC/mTLS on this machine and reads the result back in
# PyTorch: make the TorchScript module, start the server and two nodes (each on its own
# slice of Fashion-MNIST), then score the exported weights with dpfl-predict (with the module
# file) and with check.py (PyTorch).
#   examples/torchscript/run.sh            (after scripts/setup.sh and cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
BIN=target/release
WORK=${WORK:-runs/torchscript}
PORT=${PORT:-4455}
rm -rf "$WORK" && mkdir -p "$WORK"
$PY examples/torchscript/make_model.py "$WORK/model.pt"
$BIN/dpfl-certs init --out "$WORK/fed" --san localhost --san 127.0.0.1 --nodes 2 > /dev/null
$BIN/dpfl-server --certs "$WORK/fed/server" --listen 127.0.0.1:$PORT --out "$WORK/out" \
    --rounds 5 --min-clients 2 --test-data fashion-mnist-test \
    --set model.kind='"torchscript"' --set model.torchscript.path="\"$WORK/model.pt\"" \
    --set model.torchscript.inputs=784 --set model.torchscript.classes=10 \
    --set test_limit=2000 --set train.lr=0.05 --set train.momentum=0.9 &
SERVER=$!
for i in 1 2; do
    $BIN/dpfl-client --server 127.0.0.1:$PORT --server-name localhost \
        --certs "$WORK/fed/node-$i" --name "node-$i" --data fashion-mnist --shard "$i/10" \
        --limit 3000 --model "torchscript:$WORK/model.pt:784:10" &
done
wait $SERVER
wait
echo "server's final test accuracy: $(grep -o '"test_accuracy": *[0-9.]*' "$WORK/out/summary.json" | head -1)"
echo "dpfl-predict on the exported weights: $($BIN/dpfl-predict --model "$WORK/out/model.safetensors" \
    --module "$WORK/model.pt" --data fashion-mnist-test --limit 2000 --out "$WORK/predictions.csv" | tail -1)"
echo "PyTorch on the exported weights: $($PY examples/torchscript/check.py "$WORK/model.pt" "$WORK/out/model.safetensors")"
