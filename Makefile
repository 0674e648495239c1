# Two commands do all the set-up on a fresh machine:
#   make image PROMPT="red apple"   -> writes image.png with the model at the repo root
#   make test                       -> lint + the test suite (what .ci/run calls)
PYTHON ?= python3
PROMPT ?= smiling face with heart-eyes
OUT ?= image.png
TORCH ?= torch==2.13.0

.PHONY: setup image-setup browser lint test image
setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH)"
	@$(PYTHON) -m pip install -q -e ".[dev]"

# Headless Chromium + chromedriver for the real-browser test (Debian packages). Required in CI; elsewhere a
# failed install only means that one test is skipped (it says so).
browser:
	@if [ -n "$${CI:-}" ]; then bash scripts/install-browser.sh; \
	else bash scripts/install-browser.sh || echo "note: no headless Chromium; the browser test will be skipped"; fi

lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: lint browser
	$(PYTHON) -m pytest -q -n auto --maxprocesses 4  # pytest-xdist: a worker per core, the cores shared out (tests/conftest.py)

# `make image` installs only when this checkout's sdxs is not importable yet (saves ~15 s on every later image)
image-setup:
	@$(PYTHON) -c "import sys, sdxs, diffusers; sys.exit(not sdxs.__file__.startswith('$(CURDIR)/'))" 2>/dev/null \
		|| $(MAKE) --no-print-directory setup

image: image-setup
	$(PYTHON) -m sdxs generate "$(PROMPT)" --output "$(OUT)"
