#!/usr/bin/env bash
# photoset's two entry points on a fresh machine (see README):
#   ./tasks.sh demo   set up, then run the offline demo end to end (local photo server, tiny models)
#   ./tasks.sh test   set up, then run the whole test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"

VENV=${PHOTOSET_VENV:-.venv}
PY="$VENV/bin/python"

setup_python() {
  [ -x "$PY" ] || python3 -m venv "$VENV"
  # Reinstall only when the dependency files changed.
  local stamp="$VENV/.photoset-deps" want
  want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$PY" -m pip install -q --upgrade pip
    # constraints.txt pins every package to the tested versions (torch==2.13.0: the CPU wheel where
    # one is provided locally; see README "GPU machines" for CUDA).
    "$PY" -m pip install -q -c constraints.txt -e ".[dev]"
    echo "$want" > "$stamp"
  fi
}

# Debian packages some tests need: Chromium (real-browser UI test) and PostgreSQL (instance test).
setup_system() {
  local missing=()
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      { apt-get update -qq >/dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" fonts-liberation >/dev/null; } ||
        echo "note: could not install ${missing[*]}; the tests that need them will be skipped" >&2
    else
      echo "note: ${missing[*]} not installed (needs root + apt); the tests that need them will be skipped" >&2
    fi
  fi
}

case "${1:-}" in
  demo)
    setup_python
    shift
    exec "$VENV/bin/photoset" demo "$@"
    ;;
  test)
    setup_python
    setup_system
    shift
    exec "$PY" -m pytest -q "$@"
    ;;
  *)
    echo "usage: ./tasks.sh demo|test [args...]" >&2
    exit 2
    ;;
esac
