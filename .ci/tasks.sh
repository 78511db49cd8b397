#!/usr/bin/env bash
# The project's two commands, each doing all set-up first (idempotent, quick when done):
#   bash .ci/tasks.sh run    # the main job, offline, on the embedded digits
#   bash .ci/tasks.sh test   # the whole test suite
# Set-up: a Python 3.10 virtual environment in .venv from the committed lock file (via uv); Prometheus,
# promtool, Alertmanager, amtool and chromium from Debian; a small Python 3.11 tool environment in .venv-tools
# (monitoring/tools.lock) for the Grafana dashboard generator and the Compose-file check.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=.venv
TOOLS_VENV=.venv-tools
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

find_python311() {
  local candidate root
  for candidate in "${PYTHON311:-}" /usr/bin/python3.11 /usr/local/bin/python3.11; do
    if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
      echo "$candidate"; return
    fi
  done
  if root=$(pyenv root 2>/dev/null); then
    candidate=$(ls -d "$root"/versions/3.11.*/bin/python3.11 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$candidate" ]; then echo "$candidate"; return; fi
  fi
  die "Python 3.11 not found (the Grafana dashboard SDK needs it); install it (e.g. 'apt-get install python3.11') or set PYTHON311=/path/to/python3.11"
}

setup_debian_tools() {
  # Prometheus 2.42 + promtool, Alertmanager 0.25 + amtool and the blackbox exporter 0.23: the
  # monitoring tests run the real ones.
  # Chromium: the web app's tests drive Debian's (Playwright never downloads a browser here).
  local packages=() tool
  for tool in prometheus promtool; do
    command -v "$tool" >/dev/null 2>&1 || packages+=(prometheus)
  done
  for tool in prometheus-alertmanager amtool; do
    command -v "$tool" >/dev/null 2>&1 || packages+=(prometheus-alertmanager)
  done
  command -v prometheus-blackbox-exporter >/dev/null 2>&1 || packages+=(prometheus-blackbox-exporter)
  if [ -z "${DIGITS_CHROMIUM:-}" ] && [ ! -x /usr/lib/chromium/chromium ] && ! command -v chromium >/dev/null 2>&1; then
    packages+=(chromium)
  fi
  [ "${#packages[@]}" = 0 ] && return 0
  mapfile -t packages < <(printf '%s\n' "${packages[@]}" | sort -u)
  command -v apt-get >/dev/null 2>&1 || die "missing ${packages[*]} and this is not a Debian-like system: install Prometheus and promtool (2.42+), Alertmanager and amtool (0.25+), the blackbox exporter (0.23+) and put them on PATH, and set DIGITS_CHROMIUM=/path/to/chromium"
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "installing ${packages[*]} needs root (or sudo)"
    sudo="sudo"
  fi
  say "installing ${packages[*]} from Debian"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
}

setup_tools_venv() {
  local want stamp="$TOOLS_VENV/.digits-installed"
  want=$(sha256sum monitoring/tools.lock | cut -d' ' -f1)
  if [ -x "$TOOLS_VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  if ! "$TOOLS_VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
    local python
    python=$(find_python311)
    say "creating $TOOLS_VENV with $python"
    rm -rf "$TOOLS_VENV"
    "$python" -m venv --without-pip "$TOOLS_VENV"
  fi
  say "installing the monitoring tools (grafana-foundation-sdk, check-jsonschema)"
  "$VENV/bin/uv" pip install --quiet --python "$TOOLS_VENV/bin/python" --require-hashes -r monitoring/tools.lock
  echo "$want" > "$stamp"
}

setup() {
  setup_python_env
  setup_debian_tools
  setup_tools_venv
}

setup_python_env() {
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
