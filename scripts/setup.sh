#!/usr/bin/env bash
# Sets up a clone of this repository: a Python virtual environment with the package `mdeq` installed in editable
# mode (with the extras the tools and tests use), and, where apt is available, Debian's Fashion-MNIST package
# (the quick start's data). Safe to run more than once.
#
#   bash scripts/setup.sh                              # makes .venv with python3 and installs into it
#   PYTHON=python3.12 bash scripts/setup.sh            # makes .venv with that interpreter
#   (with a virtual environment active)                # installs into it; .venv then points to it
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh    # the smaller CPU-only torch
#
# Afterwards the tools and tests run with .venv/bin/python (or `source .venv/bin/activate`, then `python`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { echo "setup: $*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    # Without a terminal to ask for a password, only a password-less sudo can work.
    if [ -t 0 ]; then SUDO="sudo"; else SUDO="sudo -n"; fi
  else
    SUDO="none"
  fi
fi

# apt_install PKG...: installs Debian packages; returns non-zero (and prints nothing) when that is not possible.
apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 1
  [ "$SUDO" != "none" ] || return 1
  $SUDO apt-get update -qq >/dev/null 2>&1 || return 1
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null 2>&1 || return 1
}

# ------------------------------------------------------------------------------------------ 1. the environment
if [ -n "${VIRTUAL_ENV:-}" ] && [ -z "${PYTHON:-}" ]; then
  VENV="$VIRTUAL_ENV"
  say "installing into the active virtual environment $VENV"
  if [ -L .venv ] || [ ! -e .venv ]; then
    ln -sfn "$VENV" .venv          # so that .venv/bin/python names the environment that holds the package
  elif [ "$(cd .venv && pwd -P)" != "$(cd "$VENV" && pwd -P)" ]; then
    say "note: .venv is another environment; use $VENV/bin/python (or python while $VENV is active)"
  fi
else
  VENV="$PWD/.venv"
  CREATOR="${PYTHON:-python3}"
  command -v "$CREATOR" >/dev/null 2>&1 || { say "error: $CREATOR not found; install Python 3.9 or newer, or name one with PYTHON=/path/to/python3"; exit 1; }
  if [ -L .venv ]; then rm .venv; fi                   # a link left by an earlier run inside another environment
  if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then   # missing, or broken (e.g. made without pip)
    rm -rf .venv
    if ! "$CREATOR" -m venv .venv >/dev/null 2>&1; then
      rm -rf .venv
      VENV_PKG="$("$CREATOR" -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])')"
      say "$CREATOR -m venv failed (on Debian and Ubuntu its venv module is the package $VENV_PKG); installing $VENV_PKG"
      if ! apt_install "$VENV_PKG" || ! "$CREATOR" -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv
        say "error: could not install $VENV_PKG; install it (sudo apt-get install $VENV_PKG) and run this script again"
        exit 1
      fi
    fi
    say "created the virtual environment .venv ($("$CREATOR" --version 2>&1))"
  fi
fi
PY="$VENV/bin/python"
"$PY" -c 'import sys; assert sys.version_info >= (3, 9)' 2>/dev/null || { say "error: $PY is older than Python 3.9; name a newer one with PYTHON=/path/to/python3"; exit 1; }

# -------------------------------------------------------------------------------------- 2. the Python packages
PIP=("$PY" -m pip install -q --disable-pip-version-check)
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  say "installing torch and torchvision from $TORCH_INDEX_URL"
  "${PIP[@]}" --index-url "$TORCH_INDEX_URL" "torch>=2.1,<3" "torchvision>=0.16"
fi
say "installing the package mdeq and its requirements into $VENV (the first time this downloads torch)"
"${PIP[@]}" -e ".[all,test]"

# ------------------------------------------------------------------------------------------------ 3. the data
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
  if apt_install dataset-fashion-mnist; then
    say "installed Debian's dataset-fashion-mnist"
  else
    say "note: Debian's dataset-fashion-mnist was not installed (no apt-get, no sudo, or apt failed); the code downloads Fashion-MNIST into DATASET.ROOT on first use"
  fi
fi
if [ "$(.venv/bin/python -c 'import os, sys; print(os.path.realpath(sys.prefix))' 2>/dev/null)" = "$("$PY" -c 'import os, sys; print(os.path.realpath(sys.prefix))')" ]; then
  say "done: run the tools and tests with .venv/bin/python (or activate it: source .venv/bin/activate)"
else
  say "done: run the tools and tests with $PY"
fi
