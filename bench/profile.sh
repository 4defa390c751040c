#!/usr/bin/env bash
# Where the time of a round goes: samples a simulator run or one real node of the main job
# with `perf` (apt: linux-perf) and prints the share of CPU samples under each phase of a
# round. The method, not an artefact: nothing it writes is checked in.
#
#   bench/profile.sh sim  [EXPERIMENT.toml] [--set KEY=VALUE ...]   (default: bench/sim/main-shape.toml)
#   bench/profile.sh main                 (the main job: server + 10 nodes, node-1 and the server sampled)
#
# Call graphs come from DWARF unwinding (`--call-graph dwarf`: libtorch has no frame
# pointers), so the phase of a libtorch kernel is the dpfl function above it. Shares are of
# CPU samples of the sampled process, so they do not depend on how loaded the machine is;
# wall-clock seconds per round come from the run's own per-round timings. For a flame
# graph: `perf script -i OUT/perf.data | inferno-collapse-perf | inferno-flamegraph > f.svg`
# (cargo install inferno).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { echo "profile: perf missing (apt-get install linux-perf)" >&2; exit 1; }
OUT="${PROFILE_OUT:-$(mktemp -d)}"; mkdir -p "$OUT"
FREQ="${PROFILE_FREQ:-99}"
mode="${1:-sim}"; shift || true
record() { perf record -q -F "$FREQ" --call-graph dwarf,32768 -o "$1" -- "${@:2}"; }

# The share of CPU samples under each phase function of a round ("children" share: the
# function and everything it calls). `--no-inline` keeps perf from running addr2line on
# every frame (minutes instead of seconds). Deep libtorch stacks can exceed the 32 KiB of
# stack perf copies; those samples stay unattributed, so the shares are lower bounds.
phases() {
  perf report -i "$1" --children --no-inline --sort sym --stdio -g none --percent-limit 0 \
    2>/dev/null | grep -E "$PHASES" | sed -E 's/ +\[\.\] / /' | cut -c1-120
}
PHASES='train_share$|Mlp::train$|train_batched$|Optimizer::backward_step$|Mlp::forward$|Mlp::evaluate$'
PHASES+='|DeviceData::new$|BatchedData::new$|Dataset::subset$|Mlp::new$|Mlp::load$|privatize'
PHASES+='|Coordinator::handle_update$|accumulate$|ServerOptimizer::step$|Ledger|DataSource::load$'
PHASES+='|quinn::|rustls::conn|wire::(encode|decode)|Worker::|node::run|service::'

case "$mode" in
  sim)
    exp="${1:-bench/sim/main-shape.toml}"; shift || true
    record "$OUT/perf.data" target/release/dpfl-sim "$exp" --out "$OUT/results" "$@" >/dev/null
    echo "== dpfl-sim $exp $* (CPU samples, all threads)"
    phases "$OUT/perf.data"
    ;;
  main)
    # The main job exactly as scripts/run-main-job.sh runs it; perf attaches to the server
    # and to node-1 once they are up and stops when they exit.
    bash scripts/run-main-job.sh >"$OUT/main-job.log" 2>&1 &
    job=$!
    node=; server=
    for _ in $(seq 6000); do  # up to 10 min: the script may build first
      node=$(pgrep -n -f -- "--name node-1 " || true)
      server=$(pgrep -n -f -- "dpfl-server --config configs/main-job.toml" || true)
      [ -n "$node" ] && [ -n "$server" ] && break
      sleep 0.1
    done
    [ -n "$node" ] && [ -n "$server" ] || { echo "profile: main job did not start" >&2; exit 1; }
    perf record -q -F "$FREQ" --call-graph dwarf,32768 -o "$OUT/node-1.data" -p "$node" 2>/dev/null &
    perf record -q -F "$FREQ" --call-graph dwarf,32768 -o "$OUT/server.data" -p "$server" 2>/dev/null &
    wait "$job"
    sleep 2
    for f in server node-1; do echo "== $f (CPU samples of the process)"; phases "$OUT/$f.data"; done
    grep -E "round [0-9]+/[0-9]+:" "$OUT/main-job.log" | tail -3 || true
    ;;
  *) echo "usage: bench/profile.sh sim|main" >&2; exit 2 ;;
esac
echo "(perf data in $OUT)"
