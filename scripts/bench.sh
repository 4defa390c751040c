#!/usr/bin/env bash
# Benchmarks every stage of a round against its baseline and prints one table; the same
# figures go to results/bench.json. Does its own set-up like the other scripts.
#
#   scripts/bench.sh [--with-flower] [--skip-main-job]
#   scripts/bench.sh --sim-only [--with-flower]     (the simulator's rows alone)
#   scripts/bench.sh --device-rows cuda             (on a GPU machine: training, simulator
#                                                    and main-job rows on the GPU next to
#                                                    the same machine's CPU)
#
# --with-flower installs flwr[simulation]==1.42.0 into .venv-flower (created from the
# project's Python; torch is the project venv's own 2.13.0, reached through a .pth file, so
# both frameworks run the same libtorch) and adds Flower's simulation, run on dpfl's own
# partition of the same data, model and hyper-parameters, as the baseline of the round
# rows. Every ratio in the table is measured in this run; none is quoted.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
FLWR_VERSION=1.42.0
for a in "$@"; do
  if [ "$a" = "--with-flower" ]; then
    if ! .venv-flower/bin/python -c "import flwr, sys; sys.exit(flwr.__version__ != '$FLWR_VERSION')" 2>/dev/null; then
      echo "bench: installing flwr[simulation]==$FLWR_VERSION into .venv-flower"
      .venv/bin/python -m venv .venv-flower
      .venv-flower/bin/pip install --quiet --disable-pip-version-check "flwr[simulation]==$FLWR_VERSION"
    fi
    site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    fsite="$(.venv-flower/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$site" > "$fsite/dpfl-project-torch.pth"
  fi
done
cargo build --release -q -p dpfl-bench -p dpfl-server -p dpfl-client -p dpfl-certs -p dpfl-sim
DPFL_ROOT="$PWD" target/release/dpfl-bench "$@"
