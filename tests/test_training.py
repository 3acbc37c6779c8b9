"""Warmup training (tamis.runtime.training) and warmup sampling (tamis.runtime.warmup_sampling).

Fast tests train a private tiny random GPT-2 (the session fixtures are read-only, and
training LoRA injects layers into the model it is given). The slow test LoRA-warms the
offline SmolLM2 on real ShareGPT rows.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from conftest import make_gpt2_tokenizer, make_tiny_gpt2
from tamis.errors import ModelError, TamisError
from tamis.runtime import training
from tamis.runtime.lm_scoring import score_answers
from tamis.runtime.models import LoadedLM, load_causal_lm
from tamis.runtime.templates import get_template
from tamis.runtime.training import (
    IGNORE_INDEX,
    TrainConfig,
    TrainingError,
    TrainResult,
    default_lora_targets,
    encode_training_examples,
    load_optimizer_moments,
    train_warmup,
)
from tamis.runtime.warmup_sampling import (
    SamplingError,
    band_and_spread,
    cherry_subset,
    instruction_embeddings_and_perplexity,
    random_subset,
    subset_size,
)

ROWS = [
    {"id": f"r{i}", "instruction": f"Count to {i % 5 + 2} in words.", "input": "" if i % 3 else "slowly",
     "output": " ".join(["one", "two", "three", "four", "five", "six"][: i % 5 + 2]) + "."}
    for i in range(24)
]


def _cfg(**kw) -> TrainConfig:
    base = dict(learning_rate=5e-3, batch_size=8, warmup_ratio=0.0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def own_lm() -> LoadedLM:
    """A private tiny GPT-2 (training may touch it; the shared fixture must stay read-only)."""
    return LoadedLM(make_tiny_gpt2(), make_gpt2_tokenizer(), torch.device("cpu"), torch.float32, "tiny", "tiny-fp")


@pytest.fixture
def tiny_folder(tiny_gpt2_dir) -> Path:
    """The shared tiny GPT-2 folder (read-only: adapters and trained copies go elsewhere)."""
    return Path(tiny_gpt2_dir)


def _logits(lm: LoadedLM, text: str = "### Instruction:\nCount to 3 in words.") -> torch.Tensor:
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"].to(lm.device)
    with torch.inference_mode():
        return lm.model(input_ids=ids).logits.float()


def _mean_loss(lm: LoadedLM, rows=ROWS) -> float:
    table = score_answers(lm, rows, metric="loss", template="alpaca", progress=False)
    vals = [v for v in table.value if v is not None]
    assert len(vals) == len(rows)
    return float(np.mean(vals))


# --------------------------------------------------------------------------- tokenisation and labels


def test_prompt_tokens_are_masked_and_answer_ends_with_eos(own_lm):
    examples, skipped = encode_training_examples(own_lm, ROWS[:3], "alpaca", 512)
    assert skipped == {} and len(examples) == 3
    tok = own_lm.tokenizer
    for row, ex in zip(ROWS[:3], examples):
        prompt = get_template("alpaca").prompt(row["instruction"], row["input"])
        n_prompt = len(tok.encode(prompt))
        assert ex.input_ids[:n_prompt] == tok.encode(prompt)
        assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
        assert ex.input_ids[-1] == tok.eos_token_id
        assert tok.decode(ex.input_ids[n_prompt:-1]) == row["output"]
        assert ex.n_answer_tokens == len(ex.input_ids) - n_prompt


def test_truncation_keeps_the_part_that_fits_and_skips_rows_with_no_answer_left(own_lm):
    row = {"instruction": "Say it.", "input": "", "output": "word " * 50}
    prompt_len = len(own_lm.tokenizer.encode(get_template("alpaca").prompt("Say it.")))
    examples, skipped = encode_training_examples(own_lm, [row], "alpaca", prompt_len + 5)
    (ex,) = examples
    assert len(ex.input_ids) == prompt_len + 5 and ex.n_answer_tokens == 5
    assert own_lm.tokenizer.eos_token_id not in ex.input_ids  # cut before the EOS
    examples, skipped = encode_training_examples(own_lm, [row, {**row, "output": ""}], "alpaca", prompt_len)
    assert examples == [] and skipped == {training.R_PROMPT_TOO_LONG: 1, training.R_EMPTY_ANSWER: 1}


def test_multi_turn_chat_labels_every_assistant_turn_and_its_end_token(own_lm):
    tok = copy.deepcopy(own_lm.tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}<|endoftext|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    lm = LoadedLM(own_lm.model, tok, own_lm.device, own_lm.dtype, "tiny-chat", "x")
    row = {"messages": [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello friend"},
        {"role": "user", "content": "Count"},
        {"role": "assistant", "content": "one two"},
    ]}
    (ex,), _ = encode_training_examples(lm, [row], "chat", 512)
    labelled = tok.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert labelled == "Hello friend<|endoftext|>one two<|endoftext|>"
    assert tok.decode(ex.input_ids).startswith("<user>Hi there<assistant>Hello friend")


# --------------------------------------------------------------------------- training


def test_lora_lowers_the_answer_loss_and_the_adapter_loads(tiny_folder, tmp_path):
    lm = load_causal_lm(tiny_folder, device="cpu", dtype="fp32")
    before_logits = _logits(lm)
    before = _mean_loss(lm)
    result = train_warmup(lm, ROWS, _cfg(epochs=4, learning_rate=2e-2), tmp_path / "warm", progress=False)
    # The caller's model is left exactly as it was (LoRA layers removed again).
    assert torch.equal(_logits(lm), before_logits)
    assert not any("lora" in n for n, _ in lm.model.named_parameters())
    assert result.steps == 4 * math.ceil(len(ROWS) / 8)
    assert result.step_losses[-1] < result.step_losses[0]
    warmed = load_causal_lm(tiny_folder, device="cpu", dtype="fp32", adapter=result.final_path)
    assert not torch.allclose(_logits(warmed), before_logits)
    after = _mean_loss(warmed)
    assert after < before - 0.3, (before, after)  # a random tiny model: LoRA on attention moves it slowly
    assert warmed.fingerprint != lm.fingerprint


def test_training_is_deterministic_with_the_seed(own_lm, tmp_path):
    from safetensors.torch import load_file

    runs = [train_warmup(own_lm, ROWS, _cfg(seed=s, lora_dropout=0.1), tmp_path / f"run{i}", progress=False)
            for i, s in enumerate([7, 7, 8])]
    assert runs[0].step_losses == runs[1].step_losses
    weights = [load_file(str(r.final_path / "adapter_model.safetensors")) for r in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    # The caller's random state is not consumed.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_warmup(own_lm, ROWS[:4], _cfg(), tmp_path / "rng", progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_micro_batch_split_does_not_change_the_result(own_lm, tmp_path):
    # Dropout masks depend on the batch shapes; with dropout off the split must not matter.
    for m in own_lm.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cfg = dict(lora_dropout=0.0, epochs=2)
    big = train_warmup(own_lm, ROWS, _cfg(micro_batch_tokens=100_000, **cfg), tmp_path / "big", progress=False)
    small = train_warmup(own_lm, ROWS, _cfg(micro_batch_tokens=64, **cfg), tmp_path / "small", progress=False)
    assert np.allclose(big.step_losses, small.step_losses, rtol=1e-5, atol=1e-6)


def test_checkpoint_per_epoch_with_adam_moments_and_mean_lr(own_lm, tmp_path):
    from transformers import get_linear_schedule_with_warmup

    cfg = _cfg(epochs=2, batch_size=4, warmup_ratio=0.2, learning_rate=1e-3)
    result = train_warmup(own_lm, ROWS, cfg, tmp_path / "out", progress=False)
    assert [p.name for p in result.checkpoints] == ["epoch-1", "epoch-2"] and result.final_path == result.checkpoints[-1]
    # The schedule is HF's linear-with-warmup, stepped the way the HF Trainer steps it.
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(result.steps * 0.2), result.steps)
    hf = []
    for _ in range(result.steps):
        hf.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert np.allclose(result.step_lrs, hf)
    per_epoch = result.steps // 2
    for i, (epoch, path) in enumerate(zip(result.epochs, result.checkpoints)):
        state = json.loads((path / "state.json").read_text())
        assert state["mean_lr"] == pytest.approx(np.mean(hf[i * per_epoch : (i + 1) * per_epoch]))
        assert epoch.mean_lr == pytest.approx(state["mean_lr"])
        m, v, step = load_optimizer_moments(path)
        assert step == (i + 1) * per_epoch
        assert set(m) == set(v) and m and all("lora_" in k for k in m)
        assert all((v[k] >= 0).all() and v[k].shape == m[k].shape for k in m)
    # Moments of the two epochs differ (they are the state at each epoch's end).
    m1, _, _ = load_optimizer_moments(result.checkpoints[0])
    m2, _, _ = load_optimizer_moments(result.checkpoints[1])
    assert any(not torch.equal(m1[k], m2[k]) for k in m1)
    # The adapter's parameter names match the moments' names once peft's adapter name is added.
    from peft import PeftModel

    with warnings.catch_warnings():  # peft's own use of a name transformers 5 deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(own_lm.model), str(result.final_path), is_trainable=True)
    names = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert names == set(m2)


def test_result_json_round_trips(own_lm, tmp_path):
    result = train_warmup(own_lm, ROWS[:8], _cfg(), tmp_path / "out", progress=False)
    loaded = TrainResult.load(tmp_path / "out")
    assert loaded.to_json() == result.to_json()
    assert loaded.final_path == tmp_path / "out" / "epoch-1" and loaded.final_path.is_dir()
    assert result.tokens_per_second > 0 and result.n_trained_rows == 8


def test_an_exception_mid_training_leaves_no_output(own_lm, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = training._optimizer_step

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed mid-training")
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "_optimizer_step", failing)
    before = _logits(own_lm)
    with pytest.raises(RuntimeError, match="killed mid-training"):
        train_warmup(own_lm, ROWS, _cfg(), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither out nor a temporary folder
    assert torch.equal(_logits(own_lm), before)  # LoRA removed even on failure
    assert not any("lora" in n for n, _ in own_lm.model.named_parameters())


def test_output_folder_rules(own_lm, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(TrainingError, match="not empty"):
        train_warmup(own_lm, ROWS[:4], _cfg(), tmp_path / "full", progress=False)
    (tmp_path / "empty").mkdir()  # an empty folder (an artifact cache's) is filled
    result = train_warmup(own_lm, ROWS[:4], _cfg(), tmp_path / "empty", progress=False)
    assert (tmp_path / "empty" / "train_result.json").is_file() and result.out_dir == tmp_path / "empty"
    with pytest.raises(TrainingError, match="answer token to train on"):
        train_warmup(own_lm, [{"instruction": "x", "input": "", "output": ""}], _cfg(), tmp_path / "none", progress=False)


def test_full_fine_tuning_saves_a_loadable_model_and_leaves_the_base_alone(tiny_folder, tmp_path):
    lm = load_causal_lm(tiny_folder, device="cpu", dtype="fp32")
    before_logits, before = _logits(lm), _mean_loss(lm)
    result = train_warmup(lm, ROWS, _cfg(method="full", epochs=3, learning_rate=1e-3), tmp_path / "full", progress=False)
    assert torch.equal(_logits(lm), before_logits)
    assert any(p.suffix == ".safetensors" for p in result.final_path.iterdir())
    tuned = load_causal_lm(result.final_path, device="cpu", dtype="fp32")
    assert _mean_loss(tuned) < before - 0.5
    m, v, _ = load_optimizer_moments(result.final_path)
    assert len(m) == len([p for p in lm.model.parameters()])  # tied embeddings counted once


def test_gradient_checkpointing_gives_the_same_steps(own_lm, tmp_path):
    plain = train_warmup(own_lm, ROWS[:8], _cfg(lora_dropout=0.0), tmp_path / "a", progress=False)
    ckpt = train_warmup(own_lm, ROWS[:8], _cfg(lora_dropout=0.0, gradient_checkpointing=True), tmp_path / "b", progress=False)
    assert np.allclose(plain.step_losses, ckpt.step_losses, rtol=1e-5)
    assert all(not getattr(m, "gradient_checkpointing", False) for m in own_lm.model.modules())
    assert all(p.requires_grad for p in own_lm.model.parameters())  # the caller's flags are restored


def test_default_lora_targets():
    from transformers import LlamaConfig, LlamaForCausalLM

    assert default_lora_targets(make_tiny_gpt2()) == ("attn.c_attn", "attn.c_proj")
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=100))
    assert default_lora_targets(llama) == ("q_proj", "k_proj", "v_proj", "o_proj")
    with pytest.raises(ModelError, match="target_modules"):
        default_lora_targets(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_config_checks_and_less_preset():
    less = TrainConfig.less()
    assert (less.lora_r, less.lora_alpha, less.lora_dropout, less.epochs, less.batch_size) == (128, 512, 0.1, 4, 32)
    assert less.learning_rate == 2e-5 and less.warmup_ratio == 0.03
    with pytest.raises(TrainingError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(TrainingError, match="method"):
        TrainConfig(method="qlora")  # type: ignore[arg-type]
    assert issubclass(TrainingError, TamisError)


# --------------------------------------------------------------------------- random subset (LESS)


def test_random_subset_is_less_sampling_and_reproducible():
    ids = [f"id{i}" for i in range(1000)]
    a = random_subset(ids, 0.05)
    assert a == random_subset(ids, 0.05) and len(a) == 50 and len(set(a)) == 50
    np.random.seed(42)  # exactly LESS's load_raw_dataset
    assert a == [ids[i] for i in np.random.permutation(1000)[:50]]
    assert random_subset(ids, 0.05, seed=1) != a
    assert random_subset(ids, 7) == a[:7]  # a count takes the same permutation's head
    assert random_subset(ids, 1.0) == ids  # the whole pool, unshuffled (as LESS)
    assert subset_size(10, 0.05) == 1 and subset_size(39, 0.05) == 1 and subset_size(40, 0.05) == 2
    for bad in (0.0, 1.5, 0, 1001, True, "5%"):
        with pytest.raises(SamplingError):
            random_subset(ids, bad)  # type: ignore[arg-type]
    with pytest.raises(SamplingError, match="empty"):
        random_subset([], 0.5)


# --------------------------------------------------------------------------- cherry subset


def _synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.RandomState(seed)
    topics = [["apple", "pear", "plum", "fig"], ["rocket", "orbit", "planet", "moon"], ["verb", "noun", "clause", "tense"]]
    rows = []
    for i in range(n):
        words = rng.choice(topics[i % 3], rng.randint(2, 20))
        rows.append({"id": f"s{i}", "instruction": "Explain " + " ".join(words), "input": "", "output": "ok"})
    return rows


def test_band_and_spread_follows_the_reference_rule():
    labels = np.array([0] * 40 + [1] * 5 + [2] * 12)
    values = np.concatenate([np.arange(40)[::-1].astype(float), np.arange(5.0), np.arange(12.0)])
    values[41] = np.nan
    picked = band_and_spread(labels, values, per_cluster=10)
    # Cluster 0: band = values 9.75..29.25 → values 10..29 = indices 10..29 (pool order),
    # 20 rows, step 2 → every other one.
    assert picked[0] == list(range(10, 30, 2))
    assert picked[1] == [40, 41, 42, 43, 44]  # fewer than per_cluster: all, NaN included
    # Cluster 2: band 2.75..8.25 → 6 rows < 10 → all of them.
    assert picked[2] == [45 + v for v in range(3, 9)]


def test_cherry_subset_against_a_direct_computation(own_lm):
    from sklearn.cluster import KMeans

    rows = _synthetic_rows(90)
    sub = cherry_subset(own_lm, rows, n_clusters=3, per_cluster=4, progress=False, batch_tokens=256)
    # Direct: one row at a time, as the reference does (HF loss with labels=input_ids).
    tmpl = get_template("alpaca")
    embs, ppls = [], []
    with torch.inference_mode():
        for r in rows:
            ids = own_lm.tokenizer.encode(tmpl.prompt(r["instruction"]), return_tensors="pt")
            out = own_lm.model(ids, labels=ids, output_hidden_states=True)
            embs.append(out.hidden_states[-1].mean(dim=1)[0].numpy())
            ppls.append(float(torch.exp(out.loss)))
    embs, ppls = np.stack(embs), np.array(ppls)
    assert np.allclose(sub.perplexity, ppls, rtol=1e-4)
    labels = KMeans(n_clusters=3, random_state=0, n_init=10).fit(embs).labels_
    assert (labels == sub.labels).all()
    expected: list[int] = []
    for c in range(3):
        members = np.flatnonzero(labels == c)
        lo, hi = np.percentile(ppls[members], 25), np.percentile(ppls[members], 75)
        band = [i for i in members if lo <= ppls[i] <= hi]
        assert len(band) >= 4
        expected += band[:: len(band) // 4][:4]
        got = [i for i in sub.indices if labels[i] == c]
        assert len(got) == 4 and all(lo <= ppls[i] <= hi for i in got)
    assert sub.indices == expected
    assert sub.ids == [rows[i]["id"] for i in expected] and sub.rule == "clustered" and sub.n_clusters == 3


def test_cherry_subset_small_pool_returns_every_row(own_lm):
    rows = _synthetic_rows(5)
    sub = cherry_subset(own_lm, rows, n_clusters=100, progress=False)
    assert sub.indices == [0, 1, 2, 3, 4] and sub.rule.startswith("small pool")
    with pytest.raises(SamplingError, match="empty"):
        cherry_subset(own_lm, [], progress=False)


def test_instruction_perplexity_of_a_one_token_text_is_nan(own_lm):
    emb, ppl = instruction_embeddings_and_perplexity(own_lm, ["Hello", "Hello world, how are you"], progress=False)
    assert math.isnan(ppl[0]) and not math.isnan(ppl[1]) and emb.shape == (2, 64)


# --------------------------------------------------------------------------- SmolLM2 (slow)


@pytest.mark.slow
def test_smollm2_lora_warmup_on_sharegpt_rows(tmp_path):
    from tamis.runtime.data import load_pool, sharegpt_asset_path
    from tamis.runtime.models import smollm2_asset

    try:
        path = smollm2_asset()
        pool = load_pool(sharegpt_asset_path(), format="sharegpt", limit=200, skip_bad=True).frame
    except TamisError as e:
        pytest.skip(str(e))
    lm = load_causal_lm(path, device="cpu", dtype="fp32")  # a fresh copy: the shared fixture is read-only
    # 40 first exchanges whose question leaves room for an answer within 256 tokens.
    rows = pool.filter(pl.col("instruction").str.len_chars() < 400).head(40)
    assert rows.height == 40
    cfg = TrainConfig(template="chat", max_length=256, batch_size=8, learning_rate=2e-4)
    before = score_answers(lm, rows, metric="loss", template="chat", max_length=256, progress=False)
    started = time.perf_counter()
    result = train_warmup(lm, rows, cfg, tmp_path / "warm", progress=False)
    seconds = time.perf_counter() - started
    print(f"\nSmolLM2 LoRA warmup: {result.n_trained_rows} rows, {result.steps} steps, "
          f"{result.epochs[0].tokens} tokens, {seconds:.1f} s, {result.tokens_per_second:.0f} tokens/s, "
          f"loss {result.step_losses[0]:.3f} -> {result.step_losses[-1]:.3f}")
    assert seconds < 600  # ≈1–2 minutes on two idle cores; generous for a shared machine
    assert result.n_trained_rows + sum(result.skipped.values()) == 40
    warmed = load_causal_lm(path, device="cpu", dtype="fp32", adapter=result.final_path)
    after = score_answers(warmed, rows, metric="loss", template="chat", max_length=256, progress=False)
    pairs = [(b, a) for b, a in zip(before.value, after.value) if b is not None and a is not None]
    assert pairs and np.mean([a for _, a in pairs]) < np.mean([b for b, _ in pairs])
