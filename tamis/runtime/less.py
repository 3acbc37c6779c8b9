"""LESS's gradient features and influence scores (Xia et al. 2024, princeton-nlp/LESS), batched.

What LESS computes (less/data_selection/collect_grad_reps.py, matching.py), per warmup
checkpoint (a LoRA adapter saved each epoch with its AdamW moments):

* g — the gradient of a row's mean answer-token cross-entropy (labels -100 on the prompt)
  with respect to every LoRA weight (A and B of each adapted module), the model in eval
  mode (no dropout);
* training rows ("adam"): ``m' = 0.9 m + 0.1 g``, ``v' = 0.999 v + 0.001 g²``, feature
  ``m' / sqrt(v' + 1e-8)`` with the checkpoint's moments; target rows ("none"): ``g``;
* a Rademacher random projection to ``dim`` (8192) dimensions, rows L2-normalised;
* influence of a training row = Σ_c w_c ⟨train_c, target_c⟩ (w: each epoch's mean learning
  rate, renormalised), averaged over each target subtask's rows, max over subtasks.

The reference runs one row at a time: a forward with full-vocabulary logits, one
backward that fills ``p.grad`` of every LoRA weight, then a copy. Here, exactly the same
numbers come out of batches:

* **One forward and one backward per batch of rows.** Rows are sorted by length and cut
  into batches under a token budget (`lm_scoring`'s partition), right-padded; the model is
  causal, so a row never sees the padding nor another row. The loss of a batch is the
  sum over rows of each row's *mean* answer loss, so every token's gradient is the one
  its own row's loss gives it.
* **Per-row weight gradients from hooks, not from ``p.grad``.** A LoRA module computes
  ``B(A(x))``; the gradient of A's weight for row i is ``Σ_t gh[i,t] ⊗ x[i,t]`` (gh: the
  gradient arriving at A's output h) and of B's ``Σ_t gy[i,t] ⊗ h[i,t]``. Forward hooks
  keep x and h; the backward asks autograd for the gradients at the A outputs only, and
  a tensor hook on every B output takes gy as it passes; padded positions are zeroed in
  the rank-r factor of each product (their gradient is 0 already: nothing reads them). No
  parameter gradient is ever accumulated (LESS's sum over a batch would be useless), and
  each per-row gradient is written straight into a preallocated [rows, D] buffer.
* **Answer-only LM head**, in chunks, its backward written out (the reference's fp32
  ``softmax - onehot`` arithmetic, the product summed block by block of the vocabulary so
  that no matrix kernel sums 50k nearly cancelling terms in one run): no full-vocabulary
  logits for prompt tokens, and the logits memory is bounded.
* **Projection amortised over many rows.** The Rademacher matrix is never stored: it is
  generated block by block of parameter rows from a counter-based hash (splitmix64 of
  (seed, row, column word), 64 signs per 64-bit word, unpacked through a byte table), so
  an entry depends only on (seed, row, column) — the same on CPU and CUDA, whatever the
  block size and whichever rows share a batch. Each generated block is used for every
  row waiting in the buffer (hundreds on CPU), not for 16 as in the reference; a matrix
  small enough (`SIGN_CACHE_BYTES`) is kept as int8 signs between calls.

Memory: the gradient buffer is bounded by ``max_grad_bytes`` (rows × D × 4 bytes), the
projection by one block (``block_rows × dim`` floats), the head by one chunk of logits.
On CUDA an out-of-memory batch halves the token budget and is retried.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tamis.errors import TamisError
from tamis.runtime.lm_scoring import _partition, halved_budget, split_model
from tamis.runtime.models import LoadedLM

__all__ = [
    "GradientFeatures",
    "LessError",
    "LessStats",
    "LoraLayout",
    "RademacherProjector",
    "adam_precondition",
    "adapter",
    "checkpoint_weights",
    "gradient_features",
    "influence",
    "lora_layout",
    "per_sample_gradients",
]

Precondition = Literal["adam", "none"]
IGNORE_INDEX = -100
ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-8
R_NOT_ENCODED = "no answer token within max_length"

# Rows of answer hidden states sent through the LM head at once (bounds the fp32 logits).
_HEAD_CHUNK = {"cuda": 4096}
_HEAD_CHUNK_DEFAULT = 256


class LessError(TamisError):
    """LESS features cannot be computed (bad checkpoint, unsupported adapter, bad inputs)."""


# --------------------------------------------------------------------------- the adapter


@contextlib.contextmanager
def adapter(lm: LoadedLM, checkpoint: str | Path) -> Iterator[Any]:
    """The checkpoint's LoRA adapter attached to ``lm.model`` in place, for gradients.

    Only the LoRA weights require gradients, the model is in eval mode (no dropout, as
    the reference: ``PeftModel.from_pretrained`` leaves a loaded model in eval). Yields
    the peft model. On exit the LoRA layers are removed again (``unload``) and every
    ``requires_grad`` flag and the train/eval mode are restored: the shared model is
    left exactly as it was.
    """
    from peft import PeftModel

    path = Path(checkpoint)
    if not (path / "adapter_config.json").is_file():
        raise LessError(f"{path}: no LoRA adapter here (adapter_config.json missing)")
    model = lm.model
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    peft_model = None
    try:
        with warnings.catch_warnings():
            # peft asks transformers 5 for the deprecated `is_gradient_checkpointing`; noise only.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=True)
        peft_model.eval()
        for name, p in peft_model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                raise LessError(f"{path}: the adapter trains {name}, not only LoRA weights; LESS features need a plain LoRA adapter")
            if p.requires_grad and p.device != lm.device:
                p.data = p.data.to(lm.device)
        yield peft_model
    finally:
        try:
            if peft_model is not None:
                peft_model.base_model.unload()
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            for m, mode in modes:
                m.training = mode


# --------------------------------------------------------------------------- LoRA layout


@dataclass(frozen=True)
class _Pair:
    a: torch.nn.Module  # lora_A linear: weight [r, in]
    b: torch.nn.Module  # lora_B linear: weight [out, r]
    a_slice: tuple[int, int]  # (offset, numel) of A's weight in the flat gradient
    b_slice: tuple[int, int]


@dataclass(frozen=True)
class LoraLayout:
    """The trainable LoRA weights in the peft model's ``named_parameters`` order (the
    order and names of the optimizer file and of the reference's flat gradient)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    size: int  # D: total number of LoRA weights
    pairs: tuple[_Pair, ...] = field(repr=False, compare=False)


_LORA_NAME = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.(?P<adapter>[^.]+)\.weight$")


def lora_layout(peft_model: Any) -> LoraLayout:
    """Names, shapes and flat offsets of the trainable LoRA weights, paired A with B."""
    modules = dict(peft_model.named_modules())
    names, shapes, offsets = [], [], []
    parts: dict[tuple[str, str], dict[str, Any]] = {}
    offset = 0
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        m = _LORA_NAME.match(name)
        if m is None:
            raise LessError(f"trainable parameter {name} is not a LoRA A/B weight; per-sample gradients need a plain LoRA adapter")
        linear = modules[name[: -len(".weight")]]
        if not isinstance(linear, torch.nn.Linear) or (linear.bias is not None and linear.bias.requires_grad):
            raise LessError(f"{name}: unsupported LoRA layer {type(linear).__name__} (plain nn.Linear without bias expected)")
        key = (m["module"], m["adapter"])
        parts.setdefault(key, {})[m["kind"]] = (linear, (offset, p.numel()))
        names.append(name)
        shapes.append(tuple(p.shape))
        offsets.append(offset)
        offset += p.numel()
    if not names:
        raise LessError("the model has no trainable LoRA weights")
    pairs = []
    for (module, adapter_name), kinds in parts.items():
        if set(kinds) != {"lora_A", "lora_B"}:
            raise LessError(f"{module}: LoRA A and B must both be trainable (found {sorted(kinds)})")
        layer = modules[module]
        if adapter_name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter_name, False):
            raise LessError(f"{module}: a LoRA variant (e.g. DoRA) is not supported, only plain LoRA")
        (a, a_slice), (b, b_slice) = kinds["lora_A"], kinds["lora_B"]
        pairs.append(_Pair(a, b, a_slice, b_slice))
    return LoraLayout(tuple(names), tuple(shapes), tuple(offsets), offset, tuple(pairs))


# --------------------------------------------------------------------------- per-sample gradients


@dataclass(frozen=True)
class _Item:
    ids: list[int]
    labels: list[int]
    n_answer: int


def _items(examples: Sequence[Any]) -> list[_Item]:
    """TrainingExamples → sequences cut after their last labelled token (what follows it
    cannot change a causal model's loss), with their answer-token counts."""
    out = []
    for e in examples:
        labels = list(e.labels)
        last = max((t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX), default=0)
        out.append(_Item(list(e.input_ids[: last + 1]), labels[: last + 1], sum(1 for t in labels[1:] if t != IGNORE_INDEX)))
    return out


class _GradEngine:
    """One forward + one backward per batch; per-row LoRA gradients written into a buffer."""

    def __init__(self, lm: LoadedLM, layout: LoraLayout, *, head_chunk: int | None = None) -> None:
        self.lm = lm
        self.layout = layout
        self.base, self.head, self.softcap = split_model(lm)
        self.head_chunk = head_chunk or _HEAD_CHUNK.get(lm.device.type, _HEAD_CHUNK_DEFAULT)
        self.tokens = 0
        self.padded_tokens = 0
        self.batches = 0

    def run(self, batch: Sequence[_Item], out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` [len(batch), D] with each row's gradient; returns the rows' mean answer losses."""
        dev = self.lm.device
        b, width = len(batch), max(len(it.ids) for it in batch)
        ids = torch.zeros((b, width), dtype=torch.long)
        labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
        lengths = torch.tensor([len(it.ids) for it in batch])
        for i, it in enumerate(batch):
            ids[i, : len(it.ids)] = torch.tensor(it.ids)
            labels[i, : len(it.labels)] = torch.tensor(it.labels)
        ids, labels = ids.to(dev), labels.to(dev)
        real = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).to(dev)  # [b, W]
        n_answer = torch.tensor([it.n_answer for it in batch], device=dev, dtype=torch.float32)

        pairs = self.layout.pairs
        xs: list[torch.Tensor | None] = [None] * len(pairs)
        hs: list[torch.Tensor | None] = [None] * len(pairs)
        calls = [0] * len(pairs)

        def masked(t: torch.Tensor) -> torch.Tensor:
            # Padded positions contribute exactly 0. Their incoming gradient is 0 already
            # (causal model, no loss there); the mask, applied to the rank-r factor of each
            # product (the small one), makes it so whatever the attention kernel does.
            t = t.reshape(b, -1, t.shape[-1])
            return t * real.unsqueeze(-1).to(t.dtype)

        def on_a(k: int) -> Callable[..., None]:
            def hook(_module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
                calls[k] += 1
                xs[k], hs[k] = inputs[0].detach(), output

            return hook

        def on_b(k: int) -> Callable[..., None]:
            off, n = pairs[k].b_slice
            o, r = pairs[k].b.weight.shape

            def hook(_module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
                h = masked(inputs[0].detach())

                def grad_hook(gy: torch.Tensor) -> None:
                    g = torch.einsum("bto,btr->bor", gy.reshape(b, -1, o).float(), h.float())
                    out[:, off : off + n].view(b, o, r).copy_(g)

                output.register_hook(grad_hook)

            return hook

        handles = []
        try:
            for k, pair in enumerate(pairs):
                handles.append(pair.a.register_forward_hook(on_a(k)))
                handles.append(pair.b.register_forward_hook(on_b(k)))
            out.zero_()
            with torch.enable_grad(), _autocast(self.lm):
                hidden = self.base(input_ids=ids, use_cache=False).last_hidden_state
            if any(c != 1 for c in calls):
                raise LessError("a LoRA layer ran more or less than once per forward pass; per-sample gradients cannot be taken")
            targets = labels[:, 1:].reshape(-1)
            sel = (targets != IGNORE_INDEX).nonzero(as_tuple=True)[0]
            row_of = torch.div(sel, width - 1, rounding_mode="floor")
            weight = 1.0 / n_answer.index_select(0, row_of)
            with torch.enable_grad():
                chosen = hidden[:, :-1, :].reshape(-1, hidden.shape[-1]).index_select(0, sel)
            grad_chosen, row_loss = self._head_backward(chosen.detach(), targets.index_select(0, sel), weight, row_of, b)
            used = [k for k in range(len(pairs)) if hs[k] is not None and hs[k].requires_grad]
            grads = torch.autograd.grad(chosen, [hs[k] for k in used], grad_outputs=grad_chosen, allow_unused=True)
            for k, gh in zip(used, grads):
                if gh is None:
                    continue
                off, n = pairs[k].a_slice
                r, i = pairs[k].a.weight.shape
                x = xs[k].reshape(b, -1, i)
                g = torch.einsum("btr,bti->bri", masked(gh).float(), x.float())
                out[:, off : off + n].view(b, r, i).copy_(g)
        finally:
            for h in handles:
                h.remove()
        self.tokens += int(lengths.sum())
        self.padded_tokens += b * width
        self.batches += 1
        return row_loss

    def _head_backward(
        self, chosen: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, row_of: torch.Tensor, b: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """d(Σ_rows mean answer CE)/d(answer hidden states), the head run chunk by chunk.

        The arithmetic of the reference's fp32 cross-entropy backward (``exp(log_softmax)
        - onehot``, weighted, times the head's weight), written out for one reason: the
        product is summed block by block of the vocabulary (`_head_matmul`). Left to one
        matrix product, a chunk of a handful of rows (a short answer alone) gets a CPU
        kernel that sums all 50k terms in one run, and the terms cancel almost exactly for
        confident tokens: such a row lost a digit and a half against the reference (1e-4
        relative).
        """
        head = self.head
        if not isinstance(head, torch.nn.Linear):
            return self._head_backward_autograd(chosen, targets, weight, row_of, b)
        w_head = head.weight
        acc = torch.promote_types(chosen.dtype, torch.float32)  # fp32 (fp64 for an fp64 model)
        grad = torch.empty(chosen.shape, device=chosen.device, dtype=acc)
        row_loss = torch.zeros(b, device=chosen.device, dtype=torch.float32)
        for s in range(0, chosen.shape[0], self.head_chunk):
            e = min(s + self.head_chunk, chosen.shape[0])
            tgt, wt = targets[s:e], weight[s:e]
            rows = torch.arange(e - s, device=chosen.device)
            with torch.no_grad():
                with _autocast(self.lm):
                    z = head(chosen[s:e]).to(acc)
                slope = None
                if self.softcap is not None:  # logits = c·tanh(z/c); dlogits/dz = 1 - tanh²
                    th = torch.tanh(z / self.softcap)
                    z = th * self.softcap
                    slope = 1 - th * th
                d = torch.log_softmax(z, dim=1)
                del z
                ce = -d[rows, tgt]
                d.exp_()
                d[rows, tgt] -= 1
                if slope is not None:
                    d *= slope
                d *= wt.unsqueeze(1).to(acc)
                grad[s:e] = _head_matmul(d.to(w_head.dtype), w_head).to(acc)
            row_loss.index_add_(0, row_of[s:e], (ce * wt).float())
        return grad.to(chosen.dtype), row_loss

    def _head_backward_autograd(
        self, chosen: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, row_of: torch.Tensor, b: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same by autograd, for an LM head that is not a plain linear layer."""
        grad = torch.empty_like(chosen)
        row_loss = torch.zeros(b, device=chosen.device, dtype=torch.float32)
        for s in range(0, chosen.shape[0], self.head_chunk):
            e = min(s + self.head_chunk, chosen.shape[0])
            h = chosen[s:e].detach().requires_grad_(True)
            with torch.enable_grad(), _autocast(self.lm):
                logits = self.head(h).to(torch.promote_types(h.dtype, torch.float32))
                if self.softcap is not None:
                    logits = torch.tanh(logits / self.softcap) * self.softcap
                ce = F.cross_entropy(logits, targets[s:e], reduction="none") * weight[s:e]
                (g,) = torch.autograd.grad(ce.sum(), h)
            grad[s:e] = g
            row_loss.index_add_(0, row_of[s:e], ce.detach().float())
        return grad, row_loss


_VOCAB_BLOCK = 4096


def _head_matmul(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``q @ w`` summed over blocks of 4096 vocabulary entries: each product accumulates
    few terms whatever kernel the shape selects."""
    out = None
    for k in range(0, q.shape[1], _VOCAB_BLOCK):
        part = q[:, k : k + _VOCAB_BLOCK] @ w[k : k + _VOCAB_BLOCK]
        out = part if out is None else out.add_(part)
    return out


def _autocast(lm: LoadedLM) -> contextlib.AbstractContextManager[Any]:
    """As the warmup computes: in the model's dtype when it is not fp32."""
    if lm.dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    return torch.autocast(device_type=lm.device.type, dtype=lm.dtype)


def _default_budget(device: torch.device) -> int:
    return 16384 if device.type == "cuda" else 2048


def _default_grad_bytes(device: torch.device) -> int:
    return (8 << 30) if device.type == "cuda" else (1 << 30)


def _batched(
    engine: _GradEngine,
    items: Sequence[_Item],
    budget: int,
    max_rows: int,
    out_rows: Callable[[int], torch.Tensor],
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(positions in `items`, gradients [b, D], mean losses [b]) batch by batch, longest
    rows first. `out_rows(b)` hands out the buffer rows to write. A CUDA out-of-memory
    batch halves the token budget and the remaining rows are batched again."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i].ids))
    lengths = [len(items[i].ids) for i in order]
    overhead = 2048 if engine.lm.device.type == "cuda" else 32
    done = 0
    while done < len(order):
        sizes = _partition(lengths[done:], budget, overhead)
        for size in sizes:
            for start in range(0, size, max_rows):  # a batch never exceeds the gradient buffer
                part = order[done : done + min(max_rows, size - start)]
                try:
                    out = out_rows(len(part))
                    losses = engine.run([items[i] for i in part], out)
                except torch.OutOfMemoryError:
                    budget = halved_budget(engine.lm.device, budget, lengths[done], "lower max_length or max_grad_bytes")
                    break
                done += len(part)
                yield part, out, losses
            else:
                continue
            break  # re-partition the rest under the smaller budget


def per_sample_gradients(
    lm: LoadedLM,
    peft_model: Any,
    examples: Sequence[Any],
    *,
    batch_tokens: int | None = None,
    max_rows: int | None = None,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Per-row gradients of each row's mean answer loss w.r.t. every LoRA weight.

    `peft_model`: the model `adapter(lm, …)` yields (its LoRA layers live in ``lm.model``).
    `examples`: TrainingExamples (input ids, labels -100 where no loss is taken). Yields
    ``(positions in examples, G)`` batch by batch, G a float32 [b, D] tensor in
    `lora_layout(peft_model)` order (a new tensor per batch). One forward and one
    backward per batch of up to `batch_tokens` padded tokens and `max_rows` rows.
    """
    layout = lora_layout(peft_model)
    items = _items(examples)
    if any(it.n_answer == 0 for it in items):
        raise LessError("an example has no answer token (all labels -100): it has no gradient")
    engine = _GradEngine(lm, layout)
    budget = batch_tokens or _default_budget(lm.device)
    rows = max_rows or max(1, _default_grad_bytes(lm.device) // (4 * layout.size))
    alloc = lambda b: torch.empty((b, layout.size), device=lm.device, dtype=torch.float32)  # noqa: E731
    for part, g, _ in _batched(engine, items, budget, rows, alloc):
        yield part, g


# --------------------------------------------------------------------------- Adam preconditioning


def adam_precondition(
    g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, beta1: float = ADAM_BETA1, beta2: float = ADAM_BETA2, eps: float = ADAM_EPS
) -> torch.Tensor:
    """LESS's Adam update direction (collect_grad_reps.obtain_gradients_with_adam):
    ``m' = β1 m + (1-β1) g``, ``v' = β2 v + (1-β2) g²``, ``m' / sqrt(v' + eps)`` — eps
    inside the square root, no bias correction. `g` [..., D]; m, v [D] broadcast."""
    m1 = beta1 * m + (1 - beta1) * g
    v1 = beta2 * v + (1 - beta2) * g**2
    return m1 / torch.sqrt(v1 + eps)


def _precondition_(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, chunk: int = 1 << 20) -> None:
    """`adam_precondition` in place on g [n, D], column chunk by column chunk (bounded temporaries)."""
    for s in range(0, g.shape[1], chunk):
        e = min(s + chunk, g.shape[1])
        g[:, s:e] = adam_precondition(g[:, s:e], m[s:e], v[s:e])


def _moments(checkpoint: Path, layout: LoraLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's Adam moments flattened in layout order (matched by parameter name)."""
    from tamis.runtime.training import TrainingError, load_optimizer_moments

    try:
        m, v, _ = load_optimizer_moments(checkpoint)
    except TrainingError as e:
        raise LessError(f"{e}; LESS's Adam-preconditioned features need the warmup's optimizer moments") from None
    missing = [n for n in layout.names if n not in m or n not in v]
    if missing:
        raise LessError(f"{checkpoint}: no Adam moments for {missing[0]} (and {len(missing) - 1} more)")
    for n, shape in zip(layout.names, layout.shapes):
        if tuple(m[n].shape) != shape or tuple(v[n].shape) != shape:
            raise LessError(f"{checkpoint}: the moments of {n} have shape {tuple(m[n].shape)}, the weight {shape}")
    flat_m = torch.cat([m[n].reshape(-1).float() for n in layout.names]).to(device)
    flat_v = torch.cat([v[n].reshape(-1).float() for n in layout.names]).to(device)
    return flat_m, flat_v


# --------------------------------------------------------------------------- projection

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= (1 << 63) else c


_GAMMA = _signed(0x9E3779B97F4A7C15)
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)


def splitmix64(x: int) -> int:
    """The splitmix64 finaliser on a Python int (mod 2^64): the projector's hash, for reference."""
    z = x & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser in place on int64 words (two's-complement wrap-around;
    logical shifts as arithmetic shift + mask)."""
    t = z >> 30
    t &= (1 << 34) - 1
    z ^= t
    z *= _MUL1
    t = torch.bitwise_right_shift(z, 27, out=t)
    t &= (1 << 37) - 1
    z ^= t
    z *= _MUL2
    t = torch.bitwise_right_shift(z, 31, out=t)
    t &= (1 << 33) - 1
    z ^= t
    return z


# The sign matrix kept between calls (int8, one byte an entry): 1 GiB by default, e.g. a
# 0.9M-parameter LoRA projected to 1024 dims; LESS's full size (14.7M x 8192) is generated block
# by block on every call instead (on a GPU, fast).
SIGN_CACHE_BYTES = 1 << 30
_SIGN_CACHE: dict[str, Any] = {}


class RademacherProjector:
    """A D × dim matrix of independent ±1/sqrt(dim) entries, never stored.

    Entry (i, j) is the sign of bit ``j mod 64`` of ``splitmix64(key + (i·W + j//64 + 1)·γ)``
    (W = words per row, key from the seed, γ the golden-ratio constant): a counter-based
    generator, so an entry depends on (seed, i, j) only — not on the block size, the
    device, nor which rows are projected together. `project` generates ``block_rows``
    rows of the matrix at a time (64 signs per hashed word, unpacked through a 256 × 8
    byte table) and applies each block to every row of the batch.
    """

    def __init__(self, grad_dim: int, dim: int, seed: int = 0, *, device: str | torch.device = "cpu",
                 block_rows: int | None = None) -> None:
        if grad_dim < 1 or dim < 1:
            raise LessError(f"projection sizes must be positive (D={grad_dim}, dim={dim})")
        self.grad_dim, self.dim, self.seed = int(grad_dim), int(dim), int(seed)
        self.device = torch.device(device)
        self.words = (self.dim + 63) // 64
        budget = (1 << 26) if self.device.type == "cuda" else (1 << 22)  # entries per block
        self.block_rows = int(block_rows or max(16, budget // (self.words * 64)))
        self._key = _signed(splitmix64(self.seed * 0x632BE59BD9B4E019 + 0x1234567))
        scale = 1.0 / math.sqrt(self.dim)
        bits = torch.arange(8)
        table = ((torch.arange(256).unsqueeze(1) >> bits) & 1).float()  # [256, 8]: bit k of byte b
        self._table = ((1 - 2 * table) * scale).to(self.device)
        self.seconds_generating = 0.0

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the matrix, float32 [stop - start, dim], on the projector's device."""
        t0 = time.perf_counter()
        n = stop - start
        z = torch.arange(start * self.words + 1, stop * self.words + 1, dtype=torch.int64, device=self.device)
        z *= _GAMMA
        z += self._key
        _mix_(z)
        byts = z.view(torch.uint8).view(n, self.words * 8)  # little-endian: byte k = bits 8k..8k+7
        out = F.embedding(byts.long(), self._table).view(n, self.words * 64)
        if self.words * 64 != self.dim:
            out = out[:, : self.dim]
        self.seconds_generating += time.perf_counter() - t0
        return out

    def matrix(self) -> torch.Tensor:
        """The whole D × dim matrix (small D only: tests)."""
        return self.block(0, self.grad_dim)

    def _signs(self) -> torch.Tensor | None:
        """The whole matrix as int8 signs, generated once per process and kept while it fits
        `SIGN_CACHE_BYTES` (one matrix at a time): a scorer called chunk by chunk (a cache chunk
        can be a row or two when each row takes seconds) then generates it once, not per chunk."""
        if self.grad_dim * self.dim > SIGN_CACHE_BYTES:
            return None
        key = (self._key, self.grad_dim, self.dim, str(self.device))
        if _SIGN_CACHE.get("key") != key:
            _SIGN_CACHE.clear()
            signs = torch.empty((self.grad_dim, self.dim), dtype=torch.int8, device=self.device)
            for s in range(0, self.grad_dim, self.block_rows):
                e = min(s + self.block_rows, self.grad_dim)
                signs[s:e] = torch.sign(self.block(s, e)).to(torch.int8)
            _SIGN_CACHE.update(key=key, signs=signs)
        return _SIGN_CACHE["signs"]

    def project(self, g: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``g @ P[offset : offset + g.shape[1]]`` in float32 on the projector's device: [n, dim]."""
        if g.dim() != 2 or offset < 0 or offset + g.shape[1] > self.grad_dim:
            raise LessError(f"cannot project a {tuple(g.shape)} block at offset {offset} of a {self.grad_dim}-row projection")
        out = torch.zeros((g.shape[0], self.dim), dtype=torch.float32, device=self.device)
        signs = self._signs()
        scale = 1.0 / math.sqrt(self.dim)
        for s in range(0, g.shape[1], self.block_rows):
            e = min(s + self.block_rows, g.shape[1])
            part = g[:, s:e].to(device=self.device, dtype=torch.float32)
            if signs is not None:  # the same entries, ±1/sqrt(dim), from the kept signs
                out.addmm_(part, signs[offset + s : offset + e].to(torch.float32), alpha=scale)
            else:
                out.addmm_(part, self.block(offset + s, offset + e))
        return out


# --------------------------------------------------------------------------- features


@dataclass
class LessStats:
    rows: int = 0
    rows_with_features: int = 0
    grad_dim: int = 0
    batches: int = 0
    projections: int = 0  # passes over the projection matrix
    tokens: int = 0
    padded_tokens: int = 0
    seconds_gradients: float = 0.0  # forward + backward + per-row reconstruction
    seconds_precondition: float = 0.0
    seconds_projection: float = 0.0  # of which generating the matrix: seconds_generating
    seconds_generating: float = 0.0
    seconds: float = 0.0


class GradientFeatures(NamedTuple):
    features: np.ndarray  # [n, dim] float32, rows L2-normalised; NaN rows where reasons[i] is set
    reasons: list[str | None]
    stats: LessStats


def _encoding(checkpoint: Path, template: Any, max_length: int | None, append_eos: bool | None) -> tuple[Any, int, bool]:
    """Encoding settings: those given, else the warmup's (train_result.json next to the
    checkpoint), else tamis' training defaults."""
    from tamis.runtime.training import RESULT_FILE, TrainConfig

    cfg: dict[str, Any] = {}
    result = checkpoint.parent / RESULT_FILE
    if result.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            cfg = json.loads(result.read_text())["config"]
    d = TrainConfig()
    return (
        template if template is not None else cfg.get("template", d.template),
        max_length if max_length is not None else int(cfg.get("max_length", d.max_length)),
        append_eos if append_eos is not None else bool(cfg.get("append_eos", d.append_eos)),
    )


def _examples(lm: LoadedLM, rows: Any, template: Any, max_length: int, append_eos: bool) -> tuple[list[Any], list[int], list[str | None]]:
    """(examples, their output positions, reason per output row)."""
    from tamis.runtime.data import rows_of
    from tamis.runtime.training import TrainingExample, encode_training_examples

    if isinstance(rows, Sequence) and rows and all(isinstance(r, TrainingExample) for r in rows):
        examples = list(rows)
        reasons: list[str | None] = [None if e.n_answer_tokens > 0 else R_NOT_ENCODED for e in examples]
        keep = [i for i, e in enumerate(examples) if e.n_answer_tokens > 0]
        return [examples[i] for i in keep], keep, reasons
    rows = rows_of(rows, "gradient_features", LessError)
    examples, _ = encode_training_examples(lm, rows, template, max_length, append_eos)
    reasons = [R_NOT_ENCODED] * len(rows)
    for e in examples:
        reasons[e.row] = None
    for i, r in enumerate(reasons):
        if r is not None:  # the encoder's own reason for this row
            _, skipped = encode_training_examples(lm, [rows[i]], template, max_length, append_eos)
            reasons[i] = next(iter(skipped), R_NOT_ENCODED)
    return examples, [e.row for e in examples], reasons


def gradient_features(
    lm: LoadedLM,
    checkpoint: str | Path,
    rows: Any,
    *,
    dim: int = 8192,
    seed: int = 0,
    precondition: Precondition = "adam",
    batch_tokens: int | None = None,
    max_grad_bytes: int | None = None,
    template: Any = None,
    max_length: int | None = None,
    append_eos: bool | None = None,
    progress: bool = True,
) -> GradientFeatures:
    """LESS gradient features of `rows` at one warmup checkpoint: [n, dim] float32, L2-normalised.

    `rows`: row mappings / a Polars frame (encoded as the warmup encodes: `template`,
    `max_length`, `append_eos`, by default the warmup's own settings) or TrainingExamples.
    ``precondition="adam"``: training rows, Adam-preconditioned with the checkpoint's
    moments; ``"none"``: target rows, plain gradients. A row with no answer token gets a
    NaN row and a reason. `max_grad_bytes` bounds the buffer of per-row gradients waiting
    for projection (default 1 GiB on CPU, 8 GiB on CUDA): the more rows it holds, the
    fewer passes over the projection matrix.
    """
    if precondition not in ("adam", "none"):
        raise LessError(f"precondition must be 'adam' or 'none', got {precondition!r}")
    started = time.perf_counter()
    path = Path(checkpoint)
    tmpl, max_len, eos = _encoding(path, template, max_length, append_eos)
    examples, positions, reasons = _examples(lm, rows, tmpl, max_len, eos)
    n = len(reasons)
    feats = np.full((n, dim), np.nan, dtype=np.float32)
    stats = LessStats(rows=n, rows_with_features=len(examples))
    cuda = lm.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with adapter(lm, path) as peft_model:
        layout = lora_layout(peft_model)
        stats.grad_dim = layout.size
        moments = _moments(path, layout, lm.device) if precondition == "adam" else None
        projector = RademacherProjector(layout.size, dim, seed, device=lm.device)
        engine = _GradEngine(lm, layout)
        capacity = max(1, min(len(examples), (max_grad_bytes or _default_grad_bytes(lm.device)) // (4 * layout.size)))
        buf = torch.empty((capacity, layout.size), device=lm.device, dtype=torch.float32) if examples else None
        pending: list[int] = []  # output positions of the rows in buf[: len(pending)]

        def flush() -> None:
            if not pending:
                return
            g = buf[: len(pending)]
            sync()
            t0 = time.perf_counter()
            if moments is not None:
                _precondition_(g, *moments)
                sync()
            t1 = time.perf_counter()
            proj = F.normalize(projector.project(g), dim=1)
            feats[pending] = proj.cpu().numpy()
            sync()
            stats.seconds_precondition += t1 - t0
            stats.seconds_projection += time.perf_counter() - t1
            stats.projections += 1
            pending.clear()

        def out_rows(b: int) -> torch.Tensor:
            if len(pending) + b > capacity:
                flush()
            return buf[len(pending) : len(pending) + b]

        bar = _progress_bar(n, progress)
        bar.update(n - len(examples))
        items = _items(examples)
        budget = batch_tokens or _default_budget(lm.device)
        t_grad = time.perf_counter()
        for part, _g, _loss in _batched(engine, items, budget, capacity, out_rows):
            sync()
            stats.seconds_gradients += time.perf_counter() - t_grad
            pending.extend(positions[i] for i in part)
            bar.update(len(part))
            t_grad = time.perf_counter()
        flush()
        bar.close()
    stats.batches, stats.tokens, stats.padded_tokens = engine.batches, engine.tokens, engine.padded_tokens
    stats.seconds_generating = projector.seconds_generating
    stats.seconds = time.perf_counter() - started
    return GradientFeatures(feats, reasons, stats)


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="row", desc="LESS gradients", disable=not enabled, smoothing=0.1)


# --------------------------------------------------------------------------- checkpoints and matching


def checkpoint_weights(warmup_dir: str | Path) -> tuple[list[Path], list[float]]:
    """The warmup's epoch folders (``epoch-1``, ``epoch-2``, …, in order) and each epoch's
    mean learning rate (``state.json``): LESS's checkpoint weights, not yet renormalised."""
    from tamis.runtime.training import STATE_FILE

    root = Path(warmup_dir)
    folders = sorted((p for p in root.glob("epoch-*") if p.is_dir() and p.name[6:].isdigit()), key=lambda p: int(p.name[6:]))
    if not folders:
        raise LessError(f"{root}: no epoch-N checkpoint folders")
    weights = []
    for p in folders:
        try:
            weights.append(float(json.loads((p / STATE_FILE).read_text())["mean_lr"]))
        except (OSError, ValueError, KeyError) as e:
            raise LessError(f"{p}: cannot read the epoch's mean learning rate from {STATE_FILE} ({e})") from None
    return folders, weights


def _per_checkpoint(x: Any, what: str) -> list[np.ndarray]:
    if isinstance(x, np.ndarray) or torch.is_tensor(x):
        a = np.asarray(x.cpu() if torch.is_tensor(x) else x)
        if a.ndim != 3:
            raise LessError(f"{what} must be [rows, checkpoints, dim] or a list of [rows, dim] per checkpoint, got shape {a.shape}")
        return [a[:, c, :] for c in range(a.shape[1])]
    out = [np.asarray(t.cpu() if torch.is_tensor(t) else t) for t in x]
    if not out or any(a.ndim != 2 for a in out):
        raise LessError(f"{what}: each checkpoint's features must be [rows, dim]")
    return out


def influence(
    train: Any,
    target: Any,
    weights: Sequence[float],
    subtasks: Sequence[Any] | None = None,
    *,
    chunk_rows: int = 16384,
) -> np.ndarray:
    """LESS's influence of every training row on a target set: [n] float32.

    ``score[i, j] = Σ_c w_c ⟨train_c[i], target_c[j]⟩`` with the weights renormalised to
    sum 1 (matching.py), then the mean over each subtask's target rows and the max over
    subtasks. `train`: [n, C, dim] or a list of C arrays [n, dim]; `target` likewise
    [m, C, dim]. `subtasks`: a label per target row (any number of subtasks, any sizes);
    None: one subtask. Target rows with NaN features (no answer) are left out of their
    subtask; training rows with NaN features score NaN. Computed `chunk_rows` training
    rows at a time, in float32 as the reference.
    """
    tr, tg = _per_checkpoint(train, "train"), _per_checkpoint(target, "target")
    w = np.asarray(weights, dtype=np.float64)
    if not (len(tr) == len(tg) == len(w)):
        raise LessError(f"train has {len(tr)} checkpoints, target {len(tg)}, weights {len(w)}: they must agree")
    if w.sum() <= 0 or (w < 0).any():
        raise LessError(f"checkpoint weights must be non-negative with a positive sum, got {list(w)}")
    w = w / w.sum()
    n, m = tr[0].shape[0], tg[0].shape[0]
    if any(a.shape[0] != n for a in tr) or any(a.shape[0] != m for a in tg) or len({a.shape[1] for a in tr + tg}) != 1:
        raise LessError("feature shapes disagree between checkpoints or between train and target")
    labels = list(subtasks) if subtasks is not None else [0] * m
    if len(labels) != m:
        raise LessError(f"{len(labels)} subtask labels for {m} target rows")
    ok = ~np.any([np.isnan(a).any(axis=1) for a in tg], axis=0)
    groups: dict[Any, list[int]] = {}
    for j, lab in enumerate(labels):
        if ok[j]:
            groups.setdefault(lab, []).append(j)
    if not groups:
        raise LessError("no target row has features")
    # Mean over each subtask's columns as one matrix product: [m, k] with 1/size entries.
    avg = np.zeros((m, len(groups)), dtype=np.float32)
    for k, cols in enumerate(groups.values()):
        avg[cols, k] = 1.0 / len(cols)
    tg32 = [np.where(ok[:, None], a, 0).astype(np.float32) for a in tg]
    out = np.empty(n, dtype=np.float32)
    for s in range(0, n, chunk_rows):
        e = min(s + chunk_rows, n)
        score = np.zeros((e - s, m), dtype=np.float32)
        for c in range(len(tr)):
            score += np.float32(w[c]) * (tr[c][s:e].astype(np.float32, copy=False) @ tg32[c].T)
        out[s:e] = (score @ avg).max(axis=1)
    return out
