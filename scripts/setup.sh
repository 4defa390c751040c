#!/usr/bin/env bash
# Idempotent set-up for a new machine: Debian packages (Fashion-MNIST, OpenSSL headers,
# Chromium for the test that renders the status dashboard headless),
# a project-local Python venv with torch==2.13.0 as the libtorch that tch 0.26 needs
# (and scikit-learn for the tabular example),
# and a stable `.venv/libtorch` link that .cargo/config.toml points the build at.
# Sourced or run by scripts/run-main-job.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

missing=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing Debian packages: ${missing[*]}" >&2
    echo "setup: run: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

TORCH_VERSION=2.13.0
if ! .venv/bin/python -c "import sys, importlib.metadata as m; sys.exit(0 if m.version('torch').split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  echo "setup: creating .venv with torch==$TORCH_VERSION (libtorch for tch 0.26; ~5 GB, a few minutes)"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
fi
# scikit-learn: the breast-cancer table of the tabular example ships inside its wheel
# (sklearn/datasets/data/breast_cancer.csv), and the example's centralised baseline uses it.
SKLEARN_VERSION=1.9.1
if ! .venv/bin/python -c "import sys, importlib.metadata as m; sys.exit(0 if m.version('scikit-learn') == '$SKLEARN_VERSION' else 1)" 2>/dev/null; then
  echo "setup: installing scikit-learn==$SKLEARN_VERSION into .venv (tabular example)"
  .venv/bin/pip install --quiet --disable-pip-version-check "scikit-learn==$SKLEARN_VERSION"
fi
site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
[ -d "$site/torch/lib" ] || { echo "setup: $site/torch/lib missing; delete .venv and retry" >&2; exit 1; }
ln -sfn "$site/torch" .venv/libtorch
