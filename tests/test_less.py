"""LESS gradient features (tamis.runtime.less): batched per-sample LoRA gradients against
the reference's one-row backward, Adam preconditioning, the Rademacher projector, and
influence matching.

A private copy of the tiny GPT-2 is LoRA-warmed (r=4, two epochs, Adam moments saved)
once per module; attaching an adapter injects layers into the model in place, so the
shared session fixture itself is never given to `adapter`.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from tamis.runtime.less import (
    LessError,
    RademacherProjector,
    adam_precondition,
    adapter,
    checkpoint_weights,
    gradient_features,
    influence,
    lora_layout,
    per_sample_gradients,
    splitmix64,
)
from tamis.runtime.models import LoadedLM
from tamis.runtime.training import TrainConfig, encode_training_examples, load_optimizer_moments, train_warmup

MAX_LEN = 64
ROWS = [
    {"instruction": f"Count to {i % 5 + 2} in words.", "input": "" if i % 3 else "slowly",
     "output": " ".join(["one", "two", "three", "four", "five", "six"][: i % 5 + 2]) + "."}
    for i in range(8)
]
LONG_ANSWER = {"instruction": "Say many words.", "input": "", "output": " ".join(["word"] * 80)}  # cut by max_length
LONG_PROMPT = {"instruction": " ".join(["prompt"] * 80), "input": "", "output": "ok"}  # prompt fills max_length
EMPTY = {"instruction": "Say nothing.", "input": "", "output": ""}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one thread is as fast, and far steadier on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lm(tiny_lm) -> LoadedLM:
    """A private copy of the session's tiny GPT-2 (adapters are attached to it in place)."""
    return LoadedLM(copy.deepcopy(tiny_lm.model), tiny_lm.tokenizer, torch.device("cpu"), torch.float32, "tiny", "tiny-fp")


@pytest.fixture(scope="module")
def warmup(lm, tmp_path_factory):
    cfg = TrainConfig(lora_r=4, lora_alpha=8, lora_dropout=0.1, epochs=2, batch_size=4, learning_rate=1e-2,
                      warmup_ratio=0.0, max_length=MAX_LEN)
    return train_warmup(lm, ROWS, cfg, tmp_path_factory.mktemp("less") / "warmup", progress=False)


def _examples(lm, rows):
    examples, _ = encode_training_examples(lm, rows, "alpaca", MAX_LEN)
    return examples


def _one_row_gradient(peft_model, ex) -> torch.Tensor:
    """The reference's way: batch of one, HF's own loss over full logits, one backward."""
    ids = torch.tensor([ex.input_ids])
    loss = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([ex.labels])).loss
    params = [p for _, p in peft_model.named_parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- per-sample gradients


def test_per_sample_gradients_equal_the_one_row_backward(lm, warmup):
    examples = _examples(lm, [*ROWS[:5], LONG_ANSWER])
    assert len(examples[-1].input_ids) == MAX_LEN and examples[-1].labels[-1] != -100  # answer cut by max_length
    with adapter(lm, warmup.checkpoints[-1]) as peft_model:
        layout = lora_layout(peft_model)
        assert layout.names == tuple(n for n, p in peft_model.named_parameters() if p.requires_grad)
        assert len(layout.names) == 8  # A and B of c_attn and c_proj in both layers
        want = torch.stack([_one_row_gradient(peft_model, ex) for ex in examples])
        for batch_tokens in (4096, 100):  # few batches of up to 6 rows, or many of one or two
            got = torch.zeros(len(examples), layout.size)
            sizes = []
            for part, g in per_sample_gradients(lm, peft_model, examples, batch_tokens=batch_tokens):
                got[part] = g
                sizes.append(len(part))
            assert sum(sizes) == len(examples) and (max(sizes) >= 3 if batch_tokens == 4096 else len(sizes) >= 4)
            for i in range(len(examples)):
                assert _rel(got[i], want[i]) < 1e-5
                for off, shape in zip(layout.offsets, layout.shapes):  # every weight, A's (small) included
                    n = math.prod(shape)
                    assert _rel(got[i, off : off + n], want[i, off : off + n]) < 1e-4
        # No parameter gradient is accumulated along the way.
        assert all(p.grad is None for p in peft_model.parameters())


def test_in_fp64_per_sample_gradients_are_the_exact_gradient(lm, warmup):
    """The same algorithm, not a near one: in fp64, with the cross-entropy in fp64 too (HF's
    loss would cast the logits to fp32 first), tamis' gradients equal the exact one-row
    gradient to float32 rounding (its gradient buffer), closer than its fp32 path gets. In fp32 both sides round a confident
    token's p - 1 and lose digits there, each in its own order (see the README's fp64 audit)."""
    import torch.nn.functional as F

    lm64 = LoadedLM(copy.deepcopy(lm.model).double(), lm.tokenizer, torch.device("cpu"), torch.float64, "t64", "t64")
    examples = _examples(lm64, [*ROWS[:5], LONG_ANSWER])
    with adapter(lm64, warmup.checkpoints[-1]) as peft_model:
        params = [p for _, p in peft_model.named_parameters() if p.requires_grad]
        assert all(p.dtype == torch.float64 for p in params)
        want = []
        for ex in examples:
            ids = torch.tensor([ex.input_ids])
            logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            loss = F.cross_entropy(logits[0, :-1], torch.tensor(ex.labels[1:]), ignore_index=-100)
            want.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        got = torch.zeros(len(examples), lora_layout(peft_model).size)
        for part, g in per_sample_gradients(lm64, peft_model, examples):
            got[part] = g
    # 1.2e-7 here (float32 rounding of the buffer); the fp32 path on the same rows is 3.9e-7 away.
    assert max(_rel(got[i].double(), want[i]) for i in range(len(examples))) < 2.5e-7


def test_padding_never_leaks_into_other_rows(lm, warmup):
    examples = _examples(lm, ROWS[:4])
    with adapter(lm, warmup.checkpoints[0]) as peft_model:
        together = torch.cat([g for _, g in per_sample_gradients(lm, peft_model, examples, max_rows=4)])
        order = [p for part, _ in per_sample_gradients(lm, peft_model, examples, max_rows=4) for p in part]
        alone = torch.cat([g for _, g in per_sample_gradients(lm, peft_model, examples, max_rows=1)])
        order1 = [p for part, _ in per_sample_gradients(lm, peft_model, examples, max_rows=1) for p in part]
    assert sorted(order) == sorted(order1) == list(range(4))
    a = together[np.argsort(order)]
    b = alone[np.argsort(order1)]
    assert max(_rel(a[i], b[i]) for i in range(4)) < 1e-5


# --------------------------------------------------------------------------- Adam preconditioning


def test_adam_precondition_by_hand():
    g = torch.tensor([[0.5, -2.0, 0.0], [1e-3, 3.0, -1e-5]])
    m = torch.tensor([0.1, -0.2, 0.3])
    v = torch.tensor([0.01, 0.0, 0.04])
    got = adam_precondition(g, m, v)
    for i in range(2):
        for j in range(3):
            m1 = 0.9 * float(m[j]) + 0.1 * float(g[i, j])
            v1 = 0.999 * float(v[j]) + 0.001 * float(g[i, j]) ** 2
            assert float(got[i, j]) == pytest.approx(m1 / math.sqrt(v1 + 1e-8), rel=1e-5)


# --------------------------------------------------------------------------- projector


def _python_entry(seed_key: int, words: int, i: int, j: int, dim: int) -> float:
    word = splitmix64(seed_key + (i * words + j // 64 + 1) * 0x9E3779B97F4A7C15)
    return (-1.0 if (word >> (j % 64)) & 1 else 1.0) / math.sqrt(dim)


def test_projector_entries_are_the_documented_hash_and_do_not_depend_on_blocks():
    p = RademacherProjector(300, 100, seed=3)
    full = p.matrix()
    assert full.shape == (300, 100)
    key = p._key % (1 << 64)
    for i, j in [(0, 0), (0, 63), (0, 64), (1, 0), (299, 99), (150, 37)]:
        assert float(full[i, j]) == float(np.float32(_python_entry(key, p.words, i, j, 100)))
    assert torch.equal(full.abs(), torch.full_like(full, 0.1))
    assert abs(float((full > 0).float().mean()) - 0.5) < 0.03  # balanced signs
    small = RademacherProjector(300, 100, seed=3, block_rows=7)
    assert torch.equal(small.matrix(), full)
    assert torch.equal(small.block(50, 61), full[50:61])
    assert not torch.equal(RademacherProjector(300, 100, seed=4).matrix(), full)


def test_projection_is_independent_of_batch_and_split():
    torch.manual_seed(0)
    g = torch.randn(5, 1000)
    p = RademacherProjector(1000, 256, seed=0, block_rows=64)
    whole = p.project(g)
    assert torch.allclose(whole, g @ p.matrix(), atol=1e-5)
    # Each row alone, or the rows in another order, gives the same features.
    alone = torch.cat([p.project(g[i : i + 1]) for i in range(5)])
    assert torch.allclose(alone, whole, atol=1e-5)
    assert torch.allclose(p.project(g[[4, 2, 0, 1, 3]]), whole[[4, 2, 0, 1, 3]], atol=1e-5)
    # The two halves of D, projected with their offsets, add up to the whole.
    halves = p.project(g[:, :437]) + p.project(g[:, 437:], offset=437)
    assert torch.allclose(halves, whole, atol=1e-5)
    # Same seed, new projector: the same numbers; another seed: others.
    assert torch.equal(RademacherProjector(1000, 256, seed=0, block_rows=300).project(g), whole) or torch.allclose(
        RademacherProjector(1000, 256, seed=0, block_rows=300).project(g), whole, atol=1e-5)
    assert not torch.allclose(RademacherProjector(1000, 256, seed=1).project(g), whole, atol=1e-2)
    with pytest.raises(LessError):
        p.project(g, offset=1)


# --------------------------------------------------------------------------- features


def test_gradient_features_are_the_reference_pipeline(lm, warmup):
    rows = [ROWS[0], LONG_PROMPT, ROWS[3], EMPTY, LONG_ANSWER, ROWS[6]]
    ckpt = warmup.checkpoints[-1]
    out = gradient_features(lm, ckpt, rows, dim=128, seed=0, precondition="adam", progress=False)
    feats, reasons = out.features, out.reasons
    assert feats.shape == (6, 128) and feats.dtype == np.float32
    assert [r is None for r in reasons] == [True, False, True, False, True, True]
    assert reasons[1] == "prompt reaches max_length" and reasons[3] == "empty answer"
    assert np.isnan(feats[[1, 3]]).all() and not np.isnan(feats[[0, 2, 4, 5]]).any()
    assert np.allclose(np.linalg.norm(feats[[0, 2, 4, 5]], axis=1), 1.0, atol=1e-5)
    assert out.stats.rows_with_features == 4 and out.stats.batches >= 1

    # The reference: one-row gradients, Adam step with the checkpoint's moments, project, normalise.
    m, v, _ = load_optimizer_moments(ckpt)
    examples = _examples(lm, [rows[i] for i in (0, 2, 4, 5)])
    with adapter(lm, ckpt) as peft_model:
        layout = lora_layout(peft_model)
        flat_m = torch.cat([m[n].reshape(-1) for n in layout.names])
        flat_v = torch.cat([v[n].reshape(-1) for n in layout.names])
        grads = torch.stack([_one_row_gradient(peft_model, ex) for ex in examples])
    ref = adam_precondition(grads, flat_m, flat_v) @ RademacherProjector(layout.size, 128, seed=0).matrix()
    ref = torch.nn.functional.normalize(ref, dim=1).numpy()
    got = feats[[0, 2, 4, 5]]
    assert np.max(np.linalg.norm(got - ref, axis=1)) < 1e-5

    # A row's features do not depend on the rows around it.
    alone = gradient_features(lm, ckpt, [rows[4]], dim=128, progress=False).features
    assert np.allclose(alone[0], feats[4], atol=1e-5)
    # Target rows: plain gradients (another feature), also normalised.
    sgd = gradient_features(lm, ckpt, rows, dim=128, precondition="none", progress=False).features
    ref_sgd = torch.nn.functional.normalize(grads @ RademacherProjector(layout.size, 128, seed=0).matrix(), dim=1).numpy()
    assert np.max(np.linalg.norm(sgd[[0, 2, 4, 5]] - ref_sgd, axis=1)) < 1e-5
    assert not np.allclose(sgd[0], feats[0], atol=1e-2)


def test_gradient_features_with_a_tiny_gradient_buffer_give_the_same_numbers(lm, warmup):
    ckpt = warmup.checkpoints[0]
    big = gradient_features(lm, ckpt, ROWS[:5], dim=64, progress=False)
    small = gradient_features(lm, ckpt, ROWS[:5], dim=64, progress=False, max_grad_bytes=1, batch_tokens=64)
    assert small.stats.projections == 5 and big.stats.projections == 1
    assert np.allclose(small.features, big.features, atol=1e-5)


def test_checkpoint_weights_and_a_missing_adapter(lm, warmup, tmp_path):
    folders, weights = checkpoint_weights(warmup.out_dir)
    assert [p.name for p in folders] == ["epoch-1", "epoch-2"]
    assert weights == pytest.approx([e.mean_lr for e in warmup.epochs])
    with pytest.raises(LessError):
        with adapter(lm, tmp_path):
            pass
    with pytest.raises(LessError):
        checkpoint_weights(tmp_path)


# --------------------------------------------------------------------------- the shared model


def test_adapter_leaves_the_shared_model_exactly_as_it_was(lm, warmup):
    model = lm.model
    params = list(model.parameters())
    params[0].requires_grad_(True)  # an odd mix of flags and modes, to be restored as is
    params[1].requires_grad_(False)
    model.train()
    model.transformer.h[0].eval()
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    before_modes = [(n, type(m), m.training) for n, m in model.named_modules()]
    try:
        with adapter(lm, warmup.checkpoints[0]) as peft_model:
            trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
            assert trainable and all("lora_" in n for n in trainable)
            assert not any(m.training for m in model.modules())  # eval: no dropout
            examples = _examples(lm, ROWS[:2])
            list(per_sample_gradients(lm, peft_model, examples))
        after_state = model.state_dict()
        assert before_state.keys() == after_state.keys()
        assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
        assert [(n, p.requires_grad) for n, p in model.named_parameters()] == before_flags
        assert [(n, type(m), m.training) for n, m in model.named_modules()] == before_modes
        # An exception inside leaves it the same way too.
        with pytest.raises(RuntimeError):
            with adapter(lm, warmup.checkpoints[0]):
                raise RuntimeError("boom")
        assert [(n, type(m), m.training) for n, m in model.named_modules()] == before_modes
        assert [(n, p.requires_grad) for n, p in model.named_parameters()] == before_flags
    finally:
        for p in params:
            p.requires_grad_(True)
        model.eval()


# --------------------------------------------------------------------------- influence


def test_influence_against_a_direct_computation():
    rng = np.random.default_rng(0)
    n, m, dim = 7, 6, 16

    def unit(*shape):
        a = rng.standard_normal(shape).astype(np.float32)
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    train, target = unit(n, 2, dim), unit(m, 2, dim)
    weights = [3e-5, 1e-5]  # not summing to 1: renormalised to 0.75 / 0.25
    labels = ["a", "b", "a", "c", "a", "b"]  # subtasks of sizes 3, 2, 1
    got = influence(train, target, weights, labels, chunk_rows=3)
    t64, g64 = train.astype(np.float64), target.astype(np.float64)
    score = 0.75 * t64[:, 0] @ g64[:, 0].T + 0.25 * t64[:, 1] @ g64[:, 1].T
    per_task = np.stack([score[:, [0, 2, 4]].mean(1), score[:, [1, 5]].mean(1), score[:, [3]].mean(1)], axis=1)
    assert np.allclose(got, per_task.max(1), atol=1e-6)
    # Lists per checkpoint are the same input; no labels: one subtask (the plain mean).
    as_lists = influence([train[:, 0], train[:, 1]], [target[:, 0], target[:, 1]], weights)
    assert np.allclose(as_lists, score.mean(1), atol=1e-6)
    # A target row without features is left out of its subtask; a training row without them scores NaN.
    target_nan, train_nan = target.copy(), train.copy()
    target_nan[3] = np.nan
    train_nan[2] = np.nan
    got2 = influence(train_nan, target_nan, weights, labels)
    assert np.isnan(got2[2]) and np.allclose(np.delete(got2, 2), np.delete(per_task[:, :2].max(1), 2), atol=1e-6)
    with pytest.raises(LessError):
        influence(train, target, [1.0], labels)


def test_state_json_of_the_warmup_holds_the_mean_lr(warmup):
    for e in warmup.epochs:
        state = json.loads((e.path / "state.json").read_text())
        assert state["mean_lr"] == pytest.approx(e.mean_lr)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_head_backward_is_the_cross_entropy_backward(softcap):
    """The written-out head backward (blocked over the vocabulary) against autograd's, in fp64."""
    from tamis.runtime import less

    torch.manual_seed(0)
    engine = less._GradEngine.__new__(less._GradEngine)
    engine.head = torch.nn.Linear(16, 9000, bias=False).double()
    engine.softcap, engine.head_chunk = softcap, 5
    engine.lm = LoadedLM(None, None, torch.device("cpu"), torch.float64, "x", "x")
    h = torch.randn(12, 16, dtype=torch.float64) * 4
    targets = torch.randint(0, 9000, (12,))
    weight = torch.rand(12, dtype=torch.float64)
    row_of = torch.tensor([0] * 5 + [1] * 7)
    g, loss = engine._head_backward(h, targets, weight, row_of, 2)
    g_ref, loss_ref = engine._head_backward_autograd(h, targets, weight, row_of, 2)
    assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(loss, loss_ref, rtol=1e-6)
