# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
ARGS ?=

.PHONY: install serve test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: on CPU machines this is the CPU wheel on disk; unpinned torch pulls CUDA.
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/offramp serve $(ARGS)

test: install
	$(VENV)/bin/pytest -q -ra $(ARGS)

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow" $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
