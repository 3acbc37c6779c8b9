"""Training a model on a sample of the pool: the `warmup(M, P%, …)` node, really trained.

What the published recipes need from a warmup, and how it is met here:

* **LESS** (princeton-nlp/LESS, less/scripts/train/*.sh) trains LoRA on a random 5 % of
  the pool, loss on answer tokens only, AdamW, linear schedule with 3 % warmup, and keeps
  **one checkpoint per epoch with its optimizer state**: its gradient features are
  Adam-preconditioned with each checkpoint's first and second moments and weighted by
  each epoch's mean learning rate. Every epoch here therefore saves the adapter, the
  moments (``optimizer.safetensors``, keyed by parameter name), and ``state.json`` with
  the epoch's mean learning rate. `TrainConfig.less()` is LESS's exact setting.
* **Cherry LLM's pre-experienced model** is a short fine-tune of the PFM on ≈1,000
  samples (see `tamis.runtime.warmup_sampling.cherry_subset`); the repository does not
  give the training recipe, so the defaults here apply.

The loop is a small, explicit torch loop (no HF Trainer), because the things that
matter are few and must be exact:

* **Tokenisation is the scorer's** (`tamis.runtime.lm_scoring`'s encoder and the same
  templates): the warmup trains on exactly the prompt/answer split the IFD scorer later
  measures. Sequence = prompt + answer + EOS, truncated at ``max_length``; labels are -100
  on the prompt (multi-turn chat rows: one sequence, every assistant turn labelled).
* **Answer-only logits**: the base model runs to its last hidden states and only rows
  that predict a labelled token go through the LM head — no full-vocabulary logits for
  prompt tokens (the same path the scorer verified for this architecture).
* **Batches**: each epoch shuffles the rows with the seed, cuts effective batches of
  ``batch_size`` rows, and splits each into micro-batches of similar length under a
  token budget (padding stays within a micro-batch). The loss of an optimizer step is
  the mean over *all* answer tokens of its effective batch, so the result does not depend
  on how the batch was split (nor on an out-of-memory retry with smaller micro-batches).
* **Schedule as HF's** ``get_linear_schedule_with_warmup``: ``ceil(ratio × steps)`` warmup
  steps, the learning rate of step s is the schedule at s (so with warmup the very first
  step has lr 0, as in the reference runs).
* **Deterministic**: LoRA initialisation, dropout and data order all come from the seed,
  inside `torch.random.fork_rng` so the caller's random state is left alone.
* **The caller's model is not changed**: LoRA layers are removed again after training
  (``unload``), full fine-tuning trains a copy.
* **Atomic output**: everything is written into a hidden sibling directory that is renamed
  to ``out_dir`` only when training finished; an exception removes it, a killed process
  leaves only the hidden temporary.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F

from tamis.errors import ModelError, TamisError
from tamis.runtime.data import rows_of
from tamis.runtime.lm_scoring import halved_budget
from tamis.runtime.models import LoadedLM, dtype_name
from tamis.runtime.outputs import atomic_dir
from tamis.runtime.templates import Template, answer_texts, get_template

__all__ = [
    "EpochRecord",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "TrainingExample",
    "default_lora_targets",
    "encode_training_examples",
    "load_optimizer_moments",
    "train_warmup",
]

Method = Literal["lora", "full"]
Scheduler = Literal["linear", "constant"]

IGNORE_INDEX = -100
RESULT_FILE = "train_result.json"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"

# Reasons a row contributes nothing to training (counted in TrainResult.skipped).
R_NO_ANSWER = "no assistant answer"
R_EMPTY_ANSWER = "empty answer"
R_PROMPT_TOO_LONG = "prompt reaches max_length"
R_NO_ANSWER_TOKENS = "no answer token to predict"


class TrainingError(TamisError):
    """Training cannot start or cannot finish (bad settings, no usable rows, output in the way)."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Defaults: LoRA r=8 on the attention projections, one epoch, LESS's
    optimiser settings (AdamW, lr 2e-5, linear schedule, 3 % warmup, effective batch 32)."""

    method: Method = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # None: the attention q/k/v/o projections, found by `default_lora_targets`.
    target_modules: tuple[str, ...] | None = None
    epochs: int = 1
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    scheduler: Scheduler = "linear"
    warmup_ratio: float = 0.03
    batch_size: int = 32  # effective batch (rows per optimizer step), via gradient accumulation
    # Padded tokens per forward/backward pass; None: 2048 on CPU, 16384 on CUDA.
    micro_batch_tokens: int | None = None
    max_grad_norm: float | None = 1.0
    max_length: int = 512
    template: str = "alpaca"
    append_eos: bool = True
    seed: int = 42
    save_optimizer_state: bool = True
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        _check_config(self)

    @classmethod
    def less(cls, **overrides: Any) -> "TrainConfig":
        """LESS's warmup (less/scripts/train/base_training_args.sh): LoRA r=128, α=512,
        dropout 0.1 on q/k/v/o, 4 epochs, lr 2e-5, effective batch 32, 3 % warmup."""
        base: dict[str, Any] = dict(method="lora", lora_r=128, lora_alpha=512, lora_dropout=0.1, epochs=4,
                                    learning_rate=2e-5, batch_size=32, warmup_ratio=0.03, scheduler="linear")
        base.update(overrides)
        return cls(**base)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules) if self.target_modules is not None else None
        return d


def _check_config(c: TrainConfig) -> None:
    problems: list[str] = []
    if c.method not in ("lora", "full"):
        problems.append(f"method must be 'lora' or 'full', got {c.method!r}")
    if c.scheduler not in ("linear", "constant"):
        problems.append(f"scheduler must be 'linear' or 'constant', got {c.scheduler!r}")
    for name in ("lora_r", "lora_alpha", "epochs", "batch_size"):
        if getattr(c, name) < 1:
            problems.append(f"{name} must be at least 1, got {getattr(c, name)}")
    if c.learning_rate <= 0:
        problems.append(f"learning_rate must be positive, got {c.learning_rate}")
    if not 0 <= c.warmup_ratio < 1:
        problems.append(f"warmup_ratio must be in [0, 1), got {c.warmup_ratio}")
    if not 0 <= c.lora_dropout < 1:
        problems.append(f"lora_dropout must be in [0, 1), got {c.lora_dropout}")
    if c.max_length < 2:
        problems.append(f"max_length must be at least 2, got {c.max_length}")
    if c.micro_batch_tokens is not None and c.micro_batch_tokens < 2:
        problems.append(f"micro_batch_tokens must be at least 2, got {c.micro_batch_tokens}")
    if problems:
        raise TrainingError("bad training configuration: " + "; ".join(problems))


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    steps: int  # optimizer steps in this epoch
    loss: float  # mean answer-token loss over the epoch (token-weighted)
    mean_lr: float  # mean learning rate of the epoch's steps (LESS's checkpoint weight)
    tokens: int  # real (unpadded) tokens run forward in this epoch
    seconds: float
    path: Path  # the epoch's checkpoint folder


@dataclass(frozen=True)
class TrainResult:
    """What a warmup produced. `final_path` is the adapter folder (LoRA: load with
    ``load_causal_lm(base, adapter=final_path)``) or the model folder (full)."""

    out_dir: Path
    method: str
    final_path: Path
    checkpoints: list[Path]
    epochs: list[EpochRecord]
    steps: int
    step_losses: list[float]
    step_lrs: list[float]
    n_rows: int
    n_trained_rows: int
    skipped: dict[str, int]
    answer_tokens: int  # labelled tokens per epoch
    tokens_per_second: float  # real tokens (forward + backward) per second of optimizer steps
    seconds: float
    base_model: str
    base_fingerprint: str
    config: TrainConfig

    def to_json(self) -> dict[str, Any]:
        """JSON with paths relative to `out_dir` (the folder may be moved or renamed)."""
        rel = lambda p: str(Path(p).relative_to(self.out_dir))  # noqa: E731
        return {
            "method": self.method,
            "final_path": rel(self.final_path),
            "checkpoints": [rel(p) for p in self.checkpoints],
            "epochs": [{**dataclasses.asdict(e), "path": rel(e.path)} for e in self.epochs],
            "steps": self.steps,
            "step_losses": self.step_losses,
            "step_lrs": self.step_lrs,
            "n_rows": self.n_rows,
            "n_trained_rows": self.n_trained_rows,
            "skipped": self.skipped,
            "answer_tokens": self.answer_tokens,
            "tokens_per_second": self.tokens_per_second,
            "seconds": self.seconds,
            "base_model": self.base_model,
            "base_fingerprint": self.base_fingerprint,
            "config": self.config.to_json(),
        }

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str]) -> "TrainResult":
        """Read a finished training's result back (e.g. on an artifact-cache hit)."""
        root = Path(out_dir)
        try:
            d = json.loads((root / RESULT_FILE).read_text())
        except FileNotFoundError:
            raise TrainingError(f"{root} holds no finished training ({RESULT_FILE} missing)") from None
        cfg = dict(d["config"])
        cfg["target_modules"] = tuple(cfg["target_modules"]) if cfg["target_modules"] is not None else None
        epochs = [EpochRecord(**{**e, "path": root / e["path"]}) for e in d["epochs"]]
        return cls(
            out_dir=root,
            method=d["method"],
            final_path=root / d["final_path"],
            checkpoints=[root / p for p in d["checkpoints"]],
            epochs=epochs,
            steps=d["steps"],
            step_losses=d["step_losses"],
            step_lrs=d["step_lrs"],
            n_rows=d["n_rows"],
            n_trained_rows=d["n_trained_rows"],
            skipped=d["skipped"],
            answer_tokens=d["answer_tokens"],
            tokens_per_second=d["tokens_per_second"],
            seconds=d["seconds"],
            base_model=d["base_model"],
            base_fingerprint=d["base_fingerprint"],
            config=TrainConfig(**cfg),
        )


# --------------------------------------------------------------------------- tokenisation


@dataclass(frozen=True)
class TrainingExample:
    """One training sequence: token ids and labels (-100 where no loss is taken)."""

    row: int  # index of the source row
    input_ids: list[int]
    labels: list[int]

    @property
    def n_answer_tokens(self) -> int:
        # labels[0] is never predicted (nothing precedes it), so it never counts.
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


def encode_training_examples(
    lm: LoadedLM, rows: Sequence[Mapping[str, Any]], template: str | Template, max_length: int, append_eos: bool = True
) -> tuple[list[TrainingExample], dict[str, int]]:
    """Rows → training sequences (prompt masked), plus counts of rows skipped, by reason.

    Token boundaries come from encoding the prompt alone, as the scorer and both
    references locate the answer. A row whose answer is cut by `max_length` trains on the
    part that fits (without EOS); a row with no answer token left is skipped and counted.
    """
    from tamis.runtime.lm_scoring import AnswerEncoder  # the scorer's exact encoding (see module note)

    tmpl = get_template(template)
    enc = AnswerEncoder(lm.tokenizer, tmpl.add_special_tokens)
    eos = _eos_id(lm.tokenizer) if append_eos else None
    per_row = [answer_texts(tmpl, row, lm.tokenizer) for row in rows]
    flat = [t for ts in per_row for t in ts]
    # Batched encodes (one fast-tokenizer call each): prompts, and prompt+answer.
    prompt_ids = enc.encode_many([t.prompt for t in flat])
    whole_ids = enc.encode_many([t.prompt + t.answer for t in flat])
    examples: list[TrainingExample] = []
    skipped: dict[str, int] = {}
    k = 0
    for r, ts in enumerate(per_row):
        spans = [(prompt_ids[k + j], whole_ids[k + j], t.answer) for j, t in enumerate(ts)]
        k += len(ts)
        ex, reason = _encode_row(r, spans, enc, eos, max_length)
        if ex is None:
            skipped[reason] = skipped.get(reason, 0) + 1  # type: ignore[index]
        else:
            examples.append(ex)
    return examples, skipped


def _encode_row(
    row: int, turns: list[tuple[list[int], list[int], str]], enc: Any, eos: int | None, max_length: int
) -> tuple[TrainingExample | None, str | None]:
    """One row's sequence: the last turn's full text; every turn's answer span labelled.

    For multi-turn chat, turn k's prompt (history + assistant header) is a prefix of
    turn k+1's prompt, so the last turn's text holds every answer; turn k's answer is the
    tokens between len(prompt_k) and len(prompt_k + answer_k). The end-of-turn token that
    follows an answer is labelled too when it is the EOS token (the model learns to stop).
    """
    if not turns:
        return None, R_NO_ANSWER
    if all(answer == "" for _, _, answer in turns):
        return None, R_EMPTY_ANSWER
    pre = len(enc.pre)
    if pre + len(turns[0][0]) >= max_length:
        return None, R_PROMPT_TOO_LONG
    full = [*enc.pre, *turns[-1][1], *([eos] if eos is not None else [])]
    ids = full[:max_length]  # truncation drops the end, as tokenizer(..., truncation=True) does
    labels = [IGNORE_INDEX] * len(ids)
    for prompt, whole, answer in turns:
        if answer == "":
            continue
        start, end = pre + len(prompt), pre + len(whole)
        if eos is not None and end < len(full) and full[end] == eos:
            end += 1
        for t in range(max(start, 1), min(end, len(ids))):
            labels[t] = ids[t]
    ex = TrainingExample(row, ids, labels)
    if ex.n_answer_tokens == 0:  # e.g. an answer of whitespace, or one token with nothing before it
        return None, R_NO_ANSWER_TOKENS
    return ex, None


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ModelError("this tokenizer has no EOS token to end answers with; pass append_eos=False to train without one")
    return int(eos)



def _rows(examples: Any) -> list[Mapping[str, Any]]:
    return rows_of(examples, "train_warmup", TrainingError)


# --------------------------------------------------------------------------- batching


def _micro_batches(batch: list[TrainingExample], budget: int) -> list[list[TrainingExample]]:
    """Split one effective batch into micro-batches of similar length (longest first),
    each with at most `budget` padded tokens (a single longer sequence goes alone)."""
    ordered = sorted(batch, key=lambda e: -len(e.input_ids))
    out: list[list[TrainingExample]] = []
    i = 0
    while i < len(ordered):
        fit = max(1, budget // len(ordered[i].input_ids))
        out.append(ordered[i : i + fit])
        i += fit
    return out


def _epoch_batches(examples: list[TrainingExample], batch_size: int, seed: int, epoch: int) -> list[list[TrainingExample]]:
    """The epoch's effective batches: a seeded permutation, cut every `batch_size` rows."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(examples), generator=g).tolist()
    shuffled = [examples[i] for i in order]
    return [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]


def _collate(batch: list[TrainingExample], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids, labels, real tokens). Right padding with id 0 and label -100: the model is
    causal, so real tokens never attend to the padding and no attention mask is needed."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(batch):
        ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[b, : len(e.labels)] = torch.tensor(e.labels)
    return ids.to(device), labels.to(device), sum(len(e.input_ids) for e in batch)


# --------------------------------------------------------------------------- model pieces


def default_lora_targets(model: Any) -> tuple[str, ...]:
    """The attention projections to adapt (LESS: q/k/v/o), by the module names found.

    Llama/Mistral/Qwen/Gemma/OPT/Phi: ``q_proj k_proj v_proj`` and the output projection
    (``o_proj``, ``out_proj`` or ``dense``); GPT-2: the fused ``attn.c_attn`` and
    ``attn.c_proj``; GPT-NeoX/Pythia/Falcon: ``query_key_value`` and ``attention.dense``.
    """
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    paths = {name for name, _ in model.named_modules()}
    if {"q_proj", "k_proj", "v_proj"} <= leaves:
        for out in ("o_proj", "out_proj", "dense"):
            if any(p.endswith(f"attn.{out}") or p.endswith(f"attention.{out}") for p in paths):
                return ("q_proj", "k_proj", "v_proj", out)
        return ("q_proj", "k_proj", "v_proj")
    if "c_attn" in leaves:
        return ("attn.c_attn", "attn.c_proj")
    if "query_key_value" in leaves:
        return ("query_key_value", "attention.dense") if any(p.endswith("attention.dense") for p in paths) else ("query_key_value",)
    raise ModelError(
        f"cannot find the attention projections of {type(model).__name__} for LoRA; "
        "name them with target_modules (e.g. lora(targets=[...]))"
    )


def _is_conv1d_targets(model: Any, targets: tuple[str, ...]) -> bool:
    """GPT-2 stores its projections as transformers' Conv1D (weights transposed)."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) and any(n == t or n.endswith("." + t) for t in targets) for n, m in model.named_modules())


def _attach_lora(model: Any, config: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    targets = config.target_modules or default_lora_targets(model)
    lcfg = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(targets),
        fan_in_fan_out=_is_conv1d_targets(model, targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            # peft asks transformers 5 for the deprecated `is_gradient_checkpointing`; noise only.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, lcfg)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise ModelError(f"cannot attach LoRA to {type(model).__name__}: {e}") from e


def _base_and_head(model: Any) -> tuple[Any, Any, float | None]:
    """The transformer body, the LM head and the logit soft-cap of a causal LM (not peft-wrapped).

    LoRA layers are injected in place, so the body of the original model already holds them.
    """
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings()
    if base is None or base is model or head is None:
        raise ModelError(f"cannot separate the body from the LM head of {type(model).__name__}")
    return base, head, getattr(model.config, "final_logit_softcapping", None)


def _verify_architecture(lm: LoadedLM) -> None:
    """Fail before training on a model whose logits are not head(last hidden state): the
    scorer's check (run once per model), so training and scoring agree on what they support."""
    from tamis.runtime.lm_scoring import split_model

    split_model(lm)


# --------------------------------------------------------------------------- schedule


def _lr_factor(step: int, total: int, warmup: int, kind: Scheduler) -> float:
    """HF's linear / constant schedule with warmup, evaluated at optimizer step `step` (0-based)."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    return max(0.0, (total - step) / max(1, total - warmup))


# --------------------------------------------------------------------------- output folder


@contextlib.contextmanager
def _atomic_dir(out_dir: Path) -> Iterator[Path]:
    """A fresh hidden sibling of `out_dir` to write into; renamed to `out_dir` on success.

    `out_dir` may be absent or an empty directory (e.g. one an artifact cache handed out);
    anything else is refused before any work is done.
    """
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise TrainingError(f"{out_dir} already exists and is not empty; refusing to overwrite a training output")
    with atomic_dir(out_dir) as tmp:
        yield tmp


# --------------------------------------------------------------------------- the trainer


@dataclass
class _Run:
    """Mutable bookkeeping of one training run."""

    step: int = 0
    step_losses: list[float] = field(default_factory=list)
    step_lrs: list[float] = field(default_factory=list)
    tokens: int = 0
    step_seconds: float = 0.0  # time inside optimizer steps (excludes checkpoint writing)
    budget: int = 2048
    oom_retries: int = 0


def train_warmup(
    lm: LoadedLM,
    examples: Any,
    config: TrainConfig | None = None,
    out_dir: str | os.PathLike[str] = "warmup",
    progress: bool = True,
) -> TrainResult:
    """Fine-tune `lm` on `examples` (a Polars frame or a sequence of row mappings) and
    write the result to `out_dir`: ``epoch-1/``, … (adapter or model, optimizer moments,
    ``state.json``) and ``train_result.json``. `lm` itself is left as it was.
    """
    config = config or TrainConfig()
    out = Path(out_dir)
    rows = _rows(examples)
    if not rows:
        raise TrainingError("no rows to train on")
    _verify_architecture(lm)
    encoded, skipped = encode_training_examples(lm, rows, config.template, config.max_length, config.append_eos)
    if not encoded:
        raise TrainingError(f"none of the {len(rows)} rows has an answer token to train on (skipped: {skipped})")
    with _atomic_dir(out) as tmp, torch.random.fork_rng(devices=_rng_devices(lm.device)):
        torch.manual_seed(config.seed)
        result = _train(lm, encoded, len(rows), skipped, config, tmp, out, progress)
        (tmp / RESULT_FILE).write_text(json.dumps(result.to_json(), indent=2))
    return result


def train_encoded(
    lm: LoadedLM,
    encoded: list[TrainingExample],
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    n_rows: int,
    skipped: Mapping[str, int] | None = None,
    progress: bool = True,
) -> TrainResult:
    """`train_warmup` on sequences the caller encoded itself (e.g. a DEITA scorer's prompt and its label
    token, which must sit exactly where the scorer reads it); `n_rows`/`skipped`: the rows they came from."""
    out = Path(out_dir)
    if not encoded:
        raise TrainingError(f"none of the {n_rows} rows has a token to train on (skipped: {dict(skipped or {})})")
    _verify_architecture(lm)
    with _atomic_dir(out) as tmp, torch.random.fork_rng(devices=_rng_devices(lm.device)):
        torch.manual_seed(config.seed)
        result = _train(lm, encoded, n_rows, dict(skipped or {}), config, tmp, out, progress)
        (tmp / RESULT_FILE).write_text(json.dumps(result.to_json(), indent=2))
    return result


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def _train(
    lm: LoadedLM,
    encoded: list[TrainingExample],
    n_rows: int,
    skipped: dict[str, int],
    config: TrainConfig,
    tmp: Path,
    out: Path,
    progress: bool,
) -> TrainResult:
    with _trainable(lm, config) as (model, peft_model):
        trainable = [(n, p) for n, p in (peft_model or model).named_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            [p for _, p in trainable], lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8,
            weight_decay=config.weight_decay,
        )
        steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
        total = steps_per_epoch * config.epochs
        warmup = math.ceil(total * config.warmup_ratio)
        run = _Run(budget=config.micro_batch_tokens or (16384 if lm.device.type == "cuda" else 2048))
        epochs: list[EpochRecord] = []
        started = time.perf_counter()
        # counted in rows, micro-batch by micro-batch: a warmup of one big step moves too
        bar = _progress_bar(len(encoded) * config.epochs, progress)
        try:
            for epoch in range(1, config.epochs + 1):
                record = _train_epoch(lm, model, peft_model, trainable, optimizer, encoded, config, epoch, total, warmup, run, tmp, bar)
                epochs.append(record)
        finally:
            bar.close()
        seconds = time.perf_counter() - started
    # Paths are reported where they will be once the temporary folder is renamed.
    epochs = [dataclasses.replace(e, path=out / e.path.relative_to(tmp)) for e in epochs]
    return TrainResult(
        out_dir=out,
        method=config.method,
        final_path=epochs[-1].path,
        checkpoints=[e.path for e in epochs],
        epochs=epochs,
        steps=run.step,
        step_losses=run.step_losses,
        step_lrs=run.step_lrs,
        n_rows=n_rows,
        n_trained_rows=len(encoded),
        skipped=skipped,
        answer_tokens=sum(e.n_answer_tokens for e in encoded),
        tokens_per_second=run.tokens / run.step_seconds if run.step_seconds > 0 else 0.0,
        seconds=seconds,
        base_model=lm.name,
        base_fingerprint=lm.fingerprint,
        config=config,
    )


@contextlib.contextmanager
def _trainable(lm: LoadedLM, config: TrainConfig) -> Iterator[tuple[Any, Any]]:
    """(model to run, peft wrapper or None), in train mode; `lm.model` restored afterwards.

    LoRA injects its layers into `lm.model` in place and removes them again (``unload``)
    on the way out, so the shared PFM is untouched. Full fine-tuning trains a deep copy
    (twice the memory), with fp32 master weights when the model is not fp32: Adam updates
    of lr × 1e-3 vanish in bf16 weights.
    """
    was_training = lm.model.training
    if config.method == "lora":
        grad_flags = [(p, p.requires_grad) for p in lm.model.parameters()]
        for p, _ in grad_flags:
            p.requires_grad_(False)
        try:
            peft_model = _attach_lora(lm.model, config)
            try:
                _prepare(lm.model, config, lora=True)
                lm.model.train()
                yield lm.model, peft_model
            finally:
                _unprepare(lm.model, config, lora=True)
                peft_model.base_model.unload()
        finally:
            for p, flag in grad_flags:
                p.requires_grad_(flag)
            lm.model.train(was_training)
    else:
        model = copy.deepcopy(lm.model).float()
        for p in model.parameters():
            p.requires_grad_(True)
        _prepare(model, config, lora=False)
        model.train()
        try:
            yield model, None
        finally:
            del model


def _prepare(model: Any, config: TrainConfig, *, lora: bool) -> None:
    if not config.gradient_checkpointing:
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if lora:
        model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input


def _unprepare(model: Any, config: TrainConfig, *, lora: bool) -> None:
    if not config.gradient_checkpointing:
        return
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
    if lora:
        model.disable_input_require_grads()


def _train_epoch(
    lm: LoadedLM,
    model: Any,
    peft_model: Any,
    trainable: list[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    encoded: list[TrainingExample],
    config: TrainConfig,
    epoch: int,
    total: int,
    warmup: int,
    run: _Run,
    tmp: Path,
    bar: Any,
) -> EpochRecord:
    started = time.perf_counter()
    tokens_before, first_step = run.tokens, run.step
    loss_sum, label_sum = 0.0, 0
    for batch in _epoch_batches(encoded, config.batch_size, config.seed, epoch):
        lr = config.learning_rate * _lr_factor(run.step, total, warmup, config.scheduler)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch_loss, n_labels = _optimizer_step(lm, model, trainable, optimizer, batch, config, run, bar)
        loss_sum += batch_loss * n_labels
        label_sum += n_labels
        run.step += 1
        run.step_losses.append(batch_loss)
        run.step_lrs.append(lr)
        bar.set_postfix(step=f"{run.step}/{total}", epoch=epoch, loss=f"{batch_loss:.4f}", lr=f"{lr:.2e}")
    lrs = run.step_lrs[first_step:]
    path = tmp / f"epoch-{epoch}"
    record = EpochRecord(
        epoch=epoch,
        steps=run.step - first_step,
        loss=loss_sum / label_sum,
        mean_lr=sum(lrs) / len(lrs),
        tokens=run.tokens - tokens_before,
        seconds=time.perf_counter() - started,
        path=path,
    )
    _save_checkpoint(lm, model, peft_model, trainable, optimizer, config, record, run)
    return record


def _optimizer_step(
    lm: LoadedLM,
    model: Any,
    trainable: list[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    batch: list[TrainingExample],
    config: TrainConfig,
    run: _Run,
    bar: Any = None,
) -> tuple[float, int]:
    """One optimizer step over an effective batch; returns (mean answer-token loss, labels).

    On a CUDA out-of-memory error the step is redone from scratch with half the token
    budget: the gradient is normalised by the batch's label count, so the split does not
    change the result.
    """
    n_labels = sum(e.n_answer_tokens for e in batch)
    started = time.perf_counter()
    while True:
        optimizer.zero_grad(set_to_none=True)
        total, tokens, rows = 0.0, 0, 0
        try:
            for micro in _micro_batches(batch, run.budget):
                loss_sum, n_tok = _forward_loss(lm, model, micro)
                (loss_sum / n_labels).backward()
                total += float(loss_sum.detach())
                tokens += n_tok
                rows += len(micro)
                if bar is not None:
                    bar.update(len(micro))
            break
        except torch.OutOfMemoryError:
            if bar is not None:  # the step starts again: its rows are not done
                bar.n -= rows
                bar.refresh()
            _back_off(lm, run, max(len(e.input_ids) for e in batch))
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    run.tokens += tokens
    run.step_seconds += time.perf_counter() - started
    return total / n_labels, n_labels


def _back_off(lm: LoadedLM, run: _Run, longest: int) -> None:
    run.budget = halved_budget(lm.device, run.budget, longest,
                               "lower max_length, enable gradient_checkpointing, or use a smaller model")
    run.oom_retries += 1


def _forward_loss(lm: LoadedLM, model: Any, micro: list[TrainingExample]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of a micro-batch's labelled tokens (fp32), and its real token count.

    Only hidden states that predict a labelled token go through the LM head.
    """
    ids, labels, n_tokens = _collate(micro, lm.device)
    base, head, softcap = _base_and_head(model)
    with _autocast(lm):
        hidden = base(input_ids=ids, use_cache=False).last_hidden_state
        # The state at position t predicts token t+1.
        targets = labels[:, 1:].reshape(-1)
        rows = (targets != IGNORE_INDEX).nonzero(as_tuple=True)[0]
        flat = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
        logits = head(flat.index_select(0, rows)).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    loss_sum = F.cross_entropy(logits, targets.index_select(0, rows), reduction="sum")
    return loss_sum, n_tokens


def _autocast(lm: LoadedLM) -> contextlib.AbstractContextManager[Any]:
    """Compute in the model's fast dtype when it is not fp32 (weights being trained stay fp32)."""
    if lm.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=lm.device.type, dtype=lm.dtype)


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="row", desc="warmup", disable=not enabled)


# --------------------------------------------------------------------------- checkpoints


def _save_checkpoint(
    lm: LoadedLM,
    model: Any,
    peft_model: Any,
    trainable: list[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    record: EpochRecord,
    run: _Run,
) -> None:
    """The epoch's folder: adapter (LoRA) or model + tokenizer (full), the optimizer
    moments, and state.json."""
    path = record.path
    path.mkdir()
    if peft_model is not None:
        peft_model.save_pretrained(str(path), safe_serialization=True)
    else:
        # Saved in the dtype the model was loaded in; the fp32 master copy keeps training.
        state = {k: v.detach().to(lm.dtype) for k, v in model.state_dict().items()}
        model.save_pretrained(str(path), state_dict=state, safe_serialization=True)
        lm.tokenizer.save_pretrained(str(path))
    if config.save_optimizer_state:
        _save_optimizer_moments(path / OPTIMIZER_FILE, trainable, optimizer)
    state_json = {
        **dataclasses.asdict(record),
        "path": path.name,
        "global_step": run.step,
        "lrs": run.step_lrs[run.step - record.steps : run.step],
        "losses": run.step_losses[run.step - record.steps : run.step],
        "oom_retries": run.oom_retries,
        "dtype": dtype_name(lm.dtype),
        "optimizer": {"name": "adamw", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": config.weight_decay},
    }
    (path / STATE_FILE).write_text(json.dumps(state_json, indent=2))


def _save_optimizer_moments(path: Path, trainable: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer) -> None:
    """AdamW's moments as ``exp_avg.<param name>`` and ``exp_avg_sq.<param name>``.

    Keyed by name, not by position, so a consumer (LESS's Adam-preconditioned gradients)
    matches them to the parameters of the reloaded adapter without trusting an order. The
    names are those of the peft model's ``named_parameters()`` (adapter name ``default``).
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    step = 0
    for name, p in trainable:
        st = optimizer.state.get(p)
        if not st:
            raise TrainingError(f"no optimizer state for {name}: the parameter was never updated")
        tensors[f"exp_avg.{name}"] = st["exp_avg"].detach().contiguous().cpu()
        tensors[f"exp_avg_sq.{name}"] = st["exp_avg_sq"].detach().contiguous().cpu()
        step = int(st["step"])
    save_file(tensors, str(path), metadata={"format": "tamis-adamw-moments", "step": str(step)})


def load_optimizer_moments(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """(exp_avg by name, exp_avg_sq by name, Adam step) from an epoch folder or its file."""
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        p = p / OPTIMIZER_FILE
    if not p.is_file():
        raise TrainingError(f"{p}: no optimizer moments saved (train with save_optimizer_state=True)")
    m: dict[str, torch.Tensor] = {}
    v: dict[str, torch.Tensor] = {}
    with safe_open(str(p), framework="pt") as f:
        step = int((f.metadata() or {}).get("step", "0"))
        for key in f.keys():
            kind, name = key.split(".", 1)
            (m if kind == "exp_avg" else v)[name] = f.get_tensor(key)
    return m, v, step
