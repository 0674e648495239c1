#!/usr/bin/env bash
# Install what the real-browser test (tests/test_server_live.py) needs: Debian's headless Chromium, its
# matching chromedriver, and selenium from PyPI. Idempotent; run as root (or with sudo) on Debian/Ubuntu.
#   scripts/install-browser.sh            # packages + selenium
#   PYTHON=python3.11 scripts/install-browser.sh
set -euo pipefail
PYTHON="${PYTHON:-python3}"

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver
fi

"$PYTHON" -c "import selenium" 2>/dev/null || "$PYTHON" -m pip install -q "selenium>=4.20"

chromium --version
chromedriver --version
"$PYTHON" -c "import selenium; print('selenium', selenium.__version__)"
