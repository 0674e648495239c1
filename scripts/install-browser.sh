#!/usr/bin/env bash
# Install what the real-browser test (tests/test_server_live.py) needs: Debian's headless Chromium, its
# matching chromedriver, and selenium from PyPI. Idempotent; run as root (or with sudo) on Debian/Ubuntu.
# Quiet: it prints one line saying what is installed; the installers' output is shown only when a step fails
# (or with VERBOSE=1).
#   scripts/install-browser.sh            # packages + selenium
#   PYTHON=python3.11 scripts/install-browser.sh
set -euo pipefail
PYTHON="${PYTHON:-python3}"
LOG="$(mktemp "${TMPDIR:-/tmp}/install-browser.XXXXXX.log")"
trap 'rm -f "$LOG"' EXIT

# run a step with its output in $LOG; on failure print that output and stop
quietly() {
  if [ -n "${VERBOSE:-}" ]; then "$@"; return; fi
  if ! "$@" >>"$LOG" 2>&1; then
    echo "install-browser: failed: $*" >&2
    tail -n 40 "$LOG" >&2
    exit 1
  fi
}

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  quietly $SUDO apt-get update -qq
  quietly $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver
fi

"$PYTHON" -c "import selenium" 2>/dev/null || quietly "$PYTHON" -m pip install -q "selenium>=4.20"

echo "browser test: $(chromium --version 2>/dev/null | head -n 1), $(chromedriver --version 2>/dev/null | cut -d' ' -f1-2), selenium $("$PYTHON" -c 'import selenium; print(selenium.__version__)')"
