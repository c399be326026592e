#!/usr/bin/env bash
# Installs everything this project needs on a Debian machine with Python 3.9+:
# Debian's Fashion-MNIST package (the quick start's data) and the Python requirements, with the package
# itself in editable mode. Safe to run more than once.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: no apt-get; Fashion-MNIST will be downloaded into DATASET.ROOT on first use" >&2
  fi
fi

PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install -q --disable-pip-version-check -r requirements.txt pytest
"$PYTHON" -m pip install -q --disable-pip-version-check --no-deps -e .
