#!/usr/bin/env bash
# The project's two commands, each doing all set-up first (idempotent, quick when done):
#   bash .ci/tasks.sh run    # the main job, offline, on the embedded digits
#   bash .ci/tasks.sh test   # the whole test suite
# Set-up: a Python 3.10 virtual environment in .venv from the committed lock file (via uv).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=.venv
UV_VERSION=0.13.9
STAMP="$VENV/.digits-installed"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

find_python310() {
  local candidate root
  if [ -n "${PYTHON310:-}" ]; then echo "$PYTHON310"; return; fi
  if root=$(pyenv root 2>/dev/null); then
    # newest installed 3.10.x; the pyenv shim itself fails without PYENV_VERSION
    candidate=$(ls -d "$root"/versions/3.10.*/bin/python3.10 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$candidate" ]; then echo "$candidate"; return; fi
  fi
  for candidate in python3.10 /usr/bin/python3.10 /usr/local/bin/python3.10; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
      command -v "$candidate"; return
    fi
  done
  die "Python 3.10 not found (TFX 1.16 needs it); install it (e.g. 'pyenv install 3.10') or set PYTHON310=/path/to/python3.10"
}

setup() {
  local want
  want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    return 0  # already set up for exactly this lock file and pyproject
  fi
  if ! "$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
    local python
    python=$(find_python310)
    say "creating $VENV with $python"
    rm -rf "$VENV"
    "$python" -m venv "$VENV"  # with pip: TFX installs module-file wheels with 'python -m pip'
  fi
  if ! "$VENV/bin/uv" --version 2>/dev/null | grep -q "^uv $UV_VERSION"; then
    say "installing uv $UV_VERSION"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
  fi
  say "installing the locked dependencies (about 3 GB the first time)"
  "$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" -r requirements.lock
  "$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" --no-deps -e .
  echo "$want" > "$STAMP"
}

# Keras 2 (tf_keras), as TFX 1.16, TFT and TFMA expect; decided here, before any Python starts.
export TF_USE_LEGACY_KERAS=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

task="${1:-}"
shift || true
case "$task" in
  run)
    setup
    say "writing the embedded MNIST digits as a mnist-png tree"
    "$VENV/bin/digits" data sample --out data/mnist-png
    say "building TFRecords"
    # --if-changed keeps an identical build, so the pipeline's cache can reuse what it made from it.
    "$VENV/bin/digits" data build data/mnist-png --out data/tfrecords --if-changed
    say "running the TFX pipeline"
    "$VENV/bin/digits" pipeline run --data data/tfrecords "$@"
    ;;
  test)
    setup
    say "running the test suite"
    "$VENV/bin/python" -m pytest "$@"
    ;;
  setup)
    setup
    ;;
  *)
    die "usage: bash .ci/tasks.sh run|test|setup [ARGS...]"
    ;;
esac
