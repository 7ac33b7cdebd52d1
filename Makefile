# make run    install everything into .venv and start the server (config.toml, PORT overrides the port)
# make test   install the test dependencies too and run the whole suite in a loopback-only netns
# make bench  run the benchmarks (prints ratios against a baseline measured in the same run)
# make lint   ruff, then mypy --strict on signaling/ and p2pdiff/ (CI runs it after make test)
# make soak   mixed REST + SSE + peer load for SOAK_MINUTES (default 30); prints RSS and fd slopes

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NODE_STAMP := tests/interop/node_modules/.installed-stamp
PYTEST_ARGS ?=

.PHONY: run test bench soak lint system-deps clean

$(PY):
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "python3 -m venv failed: installing Debian's python3-venv"; \
	  rm -rf $(VENV); \
	  if [ "$$(id -u)" -eq 0 ]; then apt-get update -qq && apt-get install -y -qq python3-venv; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv; fi && \
	  $(PYTHON) -m venv $(VENV); }

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

run: $(STAMP)
	$(VENV)/bin/p2pdiff

system-deps:
	@scripts/system-deps.sh

$(NODE_STAMP): tests/interop/package.json tests/interop/package-lock.json | system-deps
	cd tests/interop && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

test: $(STAMP) system-deps $(NODE_STAMP)
	scripts/netns.sh $(VENV)/bin/pytest $(PYTEST_ARGS)

bench: $(STAMP) system-deps $(NODE_STAMP)
	@command -v wrk >/dev/null || { if [ "$$(id -u)" -eq 0 ]; then apt-get install -y -qq wrk; \
	  else sudo apt-get install -y -qq wrk; fi; }
	scripts/netns.sh $(PY) -m benchmarks

soak: $(STAMP) system-deps $(NODE_STAMP)
	scripts/netns.sh $(PY) -m benchmarks.soak

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) tests/interop/node_modules .pytest_cache .ruff_cache
