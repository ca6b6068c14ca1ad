# pgdr developer entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
PYTHON := .venv/bin/python
# Written after a successful install; re-run pip only when pyproject.toml changes.
STAMP := .venv/.pgdr-installed
PYTEST_ARGS ?=

# Prefect's telemetry fails offline and contends for its SQLite database.
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup system-deps test demo bench lint lock clean

setup: system-deps $(STAMP)

system-deps:
	@scripts/setup.sh system

$(STAMP): pyproject.toml
	@scripts/setup.sh venv
	@touch $@

test: setup
	$(PYTHON) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PYTHON) scripts/demo.py

bench: setup
	$(PYTHON) -m bench

lint: setup
	.venv/bin/ruff check .
	$(PYTHON) -m mypy

# Pin the run-time packages the worker image installs (Dockerfile) after a dependency change.
lock: setup
	$(PYTHON) scripts/lock_requirements.py

clean:
	rm -rf .venv .pytest_cache .ruff_cache build *.egg-info .demo
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
