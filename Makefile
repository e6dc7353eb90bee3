# Every target creates and uses .venv itself: on a fresh machine `make demo` and `make test` just work.
PYTHON ?= python3
# The torch we test. Installed first and pinned so that no dependency pulls another (CUDA) build.
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH)"
	touch $(STAMP)

# The whole suite (what CI runs).
test: $(STAMP)
	$(PY) -m pytest -q

# Skip the tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(PY) -m opendit.demo

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
