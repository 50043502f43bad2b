# Developer and CI entry points. Every target is quick the second time (stamp files).
#   make test    venv + ComfyUI hosts + tiny models, then the whole pytest suite on the pinned 0.3.75 in
#                .host/ComfyUI and the host-dependent tests (-m host) on every ../shared/hosts/comfyui-<version>.tar.gz
#                (.host/ComfyUI-<version>); two pytest-xdist workers (docs/testing.md)
#   make test-quick  the edit loop: host-free tests and a small host smoke on the pinned host, in under 3 minutes
#   make demo    the same setup, then tools/demo.py (on the pinned host)
# COMFYUI_PATH=/path/to/ComfyUI uses that ComfyUI alone instead of the hosts in .host/.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH := torch==2.14.1 torchvision==0.29.1
MODELS_DIR := .models
PYTEST_ARGS ?=
# Two workers for two cores; loadfile keeps each module on one worker (its module fixtures are built once), and
# modules are handed out in the order tests/conftest.py sorts them (slow ones first). PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder
QUICK_TESTS := not host or smoke
# Known gaps on newer hosts (pytest arguments for every host after the pinned one): none at present.
NEWER_HOST_GAPS :=

ifdef COMFYUI_PATH
export COMFYUI_PATH
endif

.PHONY: venv host models browser test test-quick demo clean distclean

venv: $(VENV)/.dcb-venv-stamp

# Rebuilt when the dev (or the pack's) requirements change; torch is installed first and alone so that
# nothing else can choose its version.
$(VENV)/.dcb-venv-stamp: requirements-dev.txt $(wildcard requirements.txt)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH)
	$(PIP) install -r requirements-dev.txt
	if [ -f requirements.txt ]; then $(PIP) install -r requirements.txt; fi
	touch $@

host: venv
	$(PY) tools/install_host.py

models: host
	$(PY) tools/make_tiny_models.py --out $(MODELS_DIR)

# The browser tests (tests/web) drive Debian's Chromium; installed here when missing (needs root), else a clear stop.
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$DCB_SKIP_BROWSER_TESTS" = 1 ] || \
	    (apt-get update -qq && apt-get install -y -qq chromium) || \
	    { echo "make test needs Chromium: apt-get update && apt-get install -y chromium (or DCB_SKIP_BROWSER_TESTS=1)"; exit 1; }

# One pytest run per host (COMFYUI_PATH names it): the whole suite on the first (pinned) host, on every further
# host the tests whose outcome can depend on the host (marker "host", see tests/conftest.py). Every host runs
# even when one fails; the exit status says if any did.
test: venv host models browser
	@trees="$$($(PY) tools/install_host.py --trees)"; test -n "$$trees" || { echo "no ComfyUI host: run make host"; exit 1; }; \
	status=0; first=1; for tree in $$trees; do \
	    echo "=== pytest against ComfyUI at $$tree"; \
	    if [ $$first = 1 ]; then \
	        COMFYUI_PATH=$$tree $(PYTEST) $(PYTEST_ARGS) || status=1; \
	    else \
	        COMFYUI_PATH=$$tree $(PYTEST) -m host $(PYTEST_ARGS) $(NEWER_HOST_GAPS) || status=1; \
	    fi; \
	    first=0; \
	done; exit $$status

# The edit loop: every host-free test, plus the smoke tests (marker "smoke") on the pinned
# host. `make test` remains the command that says a change is done.
test-quick: venv host models
	@tree="$$($(PY) tools/install_host.py --trees | head -n 1)"; test -n "$$tree" || { echo "no ComfyUI host: run make host"; exit 1; }; \
	COMFYUI_PATH=$$tree $(PYTEST) -m "$(QUICK_TESTS)" $(PYTEST_ARGS)

demo: venv host models
	$(PY) tools/demo.py

# Generated artefacts; keeps .venv (minutes to rebuild) and downloads other than the host wheel.
clean:
	rm -rf .host .models .build/host out test-artifacts .pytest_cache .hypothesis
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
