"""DEITA's evolved data (`evolve(D, M, rounds=R)`) and the scorer training examples built from it.

DEITA (Liu et al. 2024, arXiv 2312.15685, §2.3) builds its scorers' training data from a few thousand seeds:

1. **Complexity**: each seed instruction is evolved R times in depth (add constraints, deepen, concretise,
   more reasoning), each round rewriting the previous round's result, so a seed gives a chain of R+1
   instructions of growing complexity.
2. **Quality**: each seed's response is enhanced R times (more helpful, relevant, deep, creative,
   detailed), again chained, the instruction fixed.
3. **Labels**: the judge sees all variants of one seed in *one* prompt and ranks & scores them (one prompt
   for the instruction chain, one for the response chain); the score of each variant is its label.

The generator and the judge are the same model M (a local chat model through the judge backend's batched
greedy decoding, or an OpenAI-compatible endpoint). As in WizardLM, a rewrite that fails (empty, unchanged,
echoing the prompt's markers, or a prompt too long for the model) is dropped and counted; the next round
evolves the last good variant again.

**Resumable.** Seeds are cut into batches; each batch's steps (round 1 … R, then the ranking) are written to a
journal folder in the artifact cache, one small JSON file per (batch, step), each written atomically as soon
as it is generated. A killed run finds its finished steps there and generates only what is missing; once
every batch is done, the journal becomes one artifact (`generations.json`) and the folder is removed. The
journal holds raw replies only: parsing happens when the frame is assembled.

**Output**: one row per (seed, variant, kind) — the rows each scorer's prompt reads. Complexity rows hold the
variant's instruction (input folded in after the first) and no output; quality rows hold the seed's
instruction and input and the variant's response. `complexity_label` / `quality_label` are the judge's
scores (null with `label_reason` when the reply gave none: never a default 3).
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import polars as pl

from tamis.errors import TamisError
from tamis.runtime.deita_prompts import (MAX_VARIANTS, PROMPTS_VERSION, clean_rewrite, enhance_response_prompt,
                                         evolve_instruction_prompt, method_for, parse_rank_scores,
                                         rank_complexity_prompt, rank_quality_prompt, rank_reply_scaffold)
from tamis.runtime.templates import row_text, user_query

__all__ = ["EVOLVED_SCHEMA", "EvolveResult", "evolve_dataset", "generate", "scorer_examples", "scorer_rows", "seed_chains",
           "step_prompts"]

SEEDS_PER_BATCH = 16  # a killed run redoes at most one step of one batch
R_TOO_LONG = "prompt longer than the model's context"
R_NO_RESPONSE = "seed has no response to enhance"
R_NOTHING_TO_RANK = "no evolved variant to rank against"
DECODING = "greedy-whole-reply-v1"
RANKINGS = ("free", "constrained")  # how the judge's rank replies are decoded (see `evolve_dataset`)

EVOLVED_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.String, "seed_id": pl.String, "kind": pl.String, "variant": pl.Int64, "method": pl.String,
    "instruction": pl.String, "input": pl.String, "output": pl.String,
    "complexity_label": pl.Int64, "quality_label": pl.Int64, "label_reason": pl.String, "judge_said": pl.String,
}


@dataclass
class EvolveResult:
    frame: pl.DataFrame
    counts: dict[str, Any]  # what the run report says: generations, failures and null labels by reason
    generated_now: int  # generations run by this call (the rest came from the cache or the journal)
    seconds: float


# --------------------------------------------------------------------------- generation


def generate(model: Any, prompts: Sequence[str], *, max_tokens: int, batch_tokens: int | None = None,
             progress: bool = True, desc: str = "evolving") -> list[str | None]:
    """Greedy whole replies of `model` (a local chat model or a ChatEndpoint) to single-turn prompts, in
    order; None where the prompt does not fit the model's context."""
    from tamis.runtime.api_client import ChatEndpoint
    from tamis.runtime.judge import endpoint_first_lines, first_lines

    if not prompts:
        return []
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    if isinstance(model, ChatEndpoint):
        replies, _, too_long = endpoint_first_lines(model, conversations, max_tokens, progress, first_line=False,
                                                     desc=desc)
    else:
        replies, _, too_long = first_lines(model, conversations, max_tokens=max_tokens, batch_tokens=batch_tokens,
                                           progress=progress, first_line=False, desc=desc)
    return [None if skipped else reply for reply, skipped in zip(replies, too_long)]


# --------------------------------------------------------------------------- the journal


class _Journal:
    """One JSON file per (batch, step), each written atomically once its generations are done."""

    def __init__(self, folder: Path, meta: Mapping[str, Any]) -> None:
        from tamis.runtime.outputs import write_json

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "key.json").is_file():
            write_json(dict(meta), folder / "key.json")

    def _path(self, batch: int, step: str) -> Path:
        return self.folder / f"batch-{batch:05d}.{step}.json"

    def read(self, batch: int, step: str, ids: list[str]) -> list[dict] | None:
        path = self._path(batch, step)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TamisError(f"corrupt evolve journal entry {path} ({e}); delete it to generate it again") from None
        if [r.get("id") for r in record] != ids:
            raise TamisError(f"evolve journal entry {path} belongs to other seeds; delete {self.folder} to start over")
        return record

    def write(self, batch: int, step: str, record: list[dict]) -> None:
        from tamis.runtime.outputs import write_json

        write_json(record, self._path(batch, step), indent=None)


# --------------------------------------------------------------------------- evolving


@dataclass
class _Seed:
    id: str
    key: str  # content key: picks the seed's evolution methods
    instruction: str
    input: str
    output: str
    instructions: list[str] = field(default_factory=list)  # the complexity chain, the seed's query first
    instruction_methods: list[str | None] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)  # the quality chain, the seed's response first
    response_methods: list[str | None] = field(default_factory=list)

    @property
    def query(self) -> str:
        return user_query({"instruction": self.instruction, "input": self.input})


def seed_chains(rows: pl.DataFrame) -> list[_Seed]:
    missing = [c for c in ("id", "instruction") if c not in rows.columns]
    if missing:
        raise TamisError(f"evolve(...) needs the columns {missing} in its dataset (it has {rows.columns})")
    out = []
    for i, r in enumerate(rows.iter_rows(named=True)):
        if not row_text(r, "instruction").strip():
            raise TamisError(f"evolve(...): row {i} (id {r['id']!r}) has an empty `instruction` to evolve")
        s = _Seed(str(r["id"]), "", row_text(r, "instruction"), row_text(r, "input"), row_text(r, "output"))
        s.key = json.dumps([s.instruction, s.input, s.output], ensure_ascii=False)
        s.instructions, s.instruction_methods = [s.query], [None]
        s.responses, s.response_methods = ([s.output], [None]) if s.output.strip() else ([], [])
        out.append(s)
    return out


def evolve_dataset(seeds: pl.DataFrame, model: Any, *, rounds: int, max_tokens: int, artifacts: Any,
                   batch_tokens: int | None = None, progress: bool = True, ranking: str = "free",
                   seeds_per_batch: int = SEEDS_PER_BATCH) -> EvolveResult:
    """DEITA's evolved, judge-scored variants of `seeds` (see the module note), cached in `artifacts`.

    `ranking="free"` decodes the judge's rank replies greedily and parses them, as DEITA reads ChatGPT's;
    `"constrained"` holds a local judge to the "[k] Score: s" format and reads each s as its greedy choice
    among 1..n+1 (`tamis.runtime.constrained`), so every variant gets a label even from a judge too small to
    keep the format unaided."""
    from tamis.runtime.api_client import ChatEndpoint
    from tamis.runtime.cache import data_fingerprint, fingerprint

    if rounds < 1:
        raise TamisError(f"evolve(...): rounds must be at least 1, got {rounds}")
    if rounds + 1 > MAX_VARIANTS:
        raise TamisError(f"evolve(..., rounds={rounds}) gives {rounds + 1} variants per seed, which DEITA's ranking "
                         f"prompt scores 1-{rounds + 2}; its scorers read one digit 1-6: use rounds of at most "
                         f"{MAX_VARIANTS - 1}")
    if ranking not in RANKINGS:
        raise TamisError(f"evolve(..., ranking={ranking!r}): use {' or '.join(repr(r) for r in RANKINGS)}")
    if ranking == "constrained" and isinstance(model, ChatEndpoint):
        raise TamisError("evolve(..., ranking=\"constrained\") reads a local judge's next-token logits; an endpoint "
                         "gives none: bind the judge to a local chat model (--model NAME=PATH) or use ranking=\"free\"")
    started = time.perf_counter()
    items = seed_chains(seeds)
    cols = [c for c in ("id", "instruction", "input", "output") if c in seeds.columns]
    key = fingerprint({"op": "evolve", "seeds": data_fingerprint(seeds, cols), "model": model.fingerprint,
                       "rounds": rounds, "max_tokens": max_tokens, "prompts": PROMPTS_VERSION, "decoding": DECODING,
                       "ranking": ranking, "seeds_per_batch": seeds_per_batch})
    generated = 0
    if artifacts.exists(key):
        steps = json.loads((artifacts.path_for(key) / "generations.json").read_text(encoding="utf-8"))
    else:
        journal = _Journal(artifacts.path_for(key + ".journal"),
                           {"op": "evolve", "model": getattr(model, "name", "?"), "seeds": len(items), "rounds": rounds,
                            "ranking": ranking})
        steps, generated = _run(items, model, rounds, max_tokens, journal, batch_tokens, progress, seeds_per_batch,
                                ranking)
        with artifacts.building(key) as out:
            (out / "generations.json").write_text(json.dumps(steps, ensure_ascii=False), encoding="utf-8")
            (out / "summary.json").write_text(json.dumps({"op": "evolve", "seeds": len(items), "rounds": rounds,
                                                          "model": getattr(model, "name", "?")}), encoding="utf-8")
        shutil.rmtree(journal.folder, ignore_errors=True)
    frame, counts = _assemble(items, steps, rounds, seeds_per_batch)
    return EvolveResult(frame, counts, generated, time.perf_counter() - started)


def _batches(items: list[_Seed], size: int) -> list[list[_Seed]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _run(items: list[_Seed], model: Any, rounds: int, max_tokens: int, journal: _Journal,
         batch_tokens: int | None, progress: bool, size: int, ranking: str) -> tuple[dict[str, list[dict]], int]:
    """Every batch's steps, from the journal where done, generated (and journaled) where not."""
    from tqdm.auto import tqdm

    steps: dict[str, list[dict]] = {}
    generated = 0
    batches = _batches(items, size)
    with tqdm(total=len(batches) * (rounds + 1), unit="step", desc="evolve", disable=not progress) as bar:
        for b, batch in enumerate(batches):
            ids = [s.id for s in batch]
            for step in [f"round-{k}" for k in range(1, rounds + 1)] + ["rank"]:
                record = journal.read(b, step, ids)
                if record is None:
                    prompts = step_prompts(batch, step)
                    if step == "rank" and ranking == "constrained":
                        replies = rank_constrained(model, batch, prompts, progress)
                    else:
                        replies = generate(model, [p for _, _, p in prompts], max_tokens=max_tokens,
                                           batch_tokens=batch_tokens, progress=progress, desc=f"evolve {step}")
                    generated += len(prompts)
                    record = [{"id": s.id} for s in batch]
                    for (i, field_name, _), reply in zip(prompts, replies):
                        record[i][field_name] = reply
                    journal.write(b, step, record)
                steps[f"{b}/{step}"] = record
                if step != "rank":
                    _advance(batch, int(step.split("-")[1]), record)
                bar.update(1)
    return steps, generated


def step_prompts(batch: list[_Seed], step: str) -> list[tuple[int, str, str]]:
    """(seed position, record field, prompt) of a step's generations."""
    out: list[tuple[int, str, str]] = []
    if step == "rank":
        for i, s in enumerate(batch):
            if len(s.instructions) > 1:
                out.append((i, "complexity", rank_complexity_prompt(s.instructions)))
            if len(s.responses) > 1:
                out.append((i, "quality", rank_quality_prompt(s.query, s.responses)))
        return out
    k = int(step.split("-")[1])
    for i, s in enumerate(batch):
        out.append((i, "instruction", evolve_instruction_prompt(s.instructions[-1], method_for("complexity", s.key, k))))
        if s.responses:
            out.append((i, "response", enhance_response_prompt(s.query, s.responses[-1],
                                                               method_for("quality", s.key, k))))
    return out


def rank_constrained(model: Any, batch: list[_Seed], prompts: list[tuple[int, str, str]],
                     progress: bool) -> list[str | None]:
    """The rank step's replies held to "[k] Score: s" (`ranking="constrained"`), one slot per variant shown."""
    from tamis.runtime.constrained import Scaffold, constrained_replies

    scaffolds = []
    for i, field_name, _ in prompts:
        chain = batch[i].instructions if field_name == "complexity" else batch[i].responses
        scaffolds.append(Scaffold(*rank_reply_scaffold(len(chain))))
    return constrained_replies(model, [[{"role": "user", "content": p}] for _, _, p in prompts], scaffolds,
                               progress=progress, desc="evolve rank")


def _advance(batch: list[_Seed], k: int, record: list[dict], failures: Counter | None = None) -> None:
    """Apply round k's replies: each usable rewrite extends its chain; a failed one is counted and the next
    round evolves the last good variant again."""
    for s, r in zip(batch, record):
        for field_name, chain, methods, kind in (("instruction", s.instructions, s.instruction_methods, "complexity"),
                                                 ("response", s.responses, s.response_methods, "quality")):
            if field_name not in r:
                continue  # not asked (a seed without a response)
            reply = r[field_name]
            text, why = (None, R_TOO_LONG) if reply is None else clean_rewrite(reply, chain[-1])
            if text is None:
                if failures is not None:
                    failures[f"{kind}: {why}"] += 1
                continue
            chain.append(text)
            methods.append(method_for(kind, s.key, k))


def _assemble(items: list[_Seed], steps: Mapping[str, list[dict]], rounds: int,
              size: int) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The evolved frame and its counts, from the raw replies (parsed here, so a fix to parsing needs no
    regeneration)."""
    for s in items:  # rebuild the chains from the replies
        s.instructions, s.instruction_methods = [s.query], [None]
        s.responses, s.response_methods = ([s.output], [None]) if s.output.strip() else ([], [])
    failures: Counter = Counter()
    asked = 0
    rows: list[dict[str, Any]] = []
    nulls: dict[str, Counter] = {"complexity": Counter(), "quality": Counter()}
    scored: Counter = Counter()
    for b, batch in enumerate(_batches(items, size)):
        for k in range(1, rounds + 1):
            record = steps[f"{b}/round-{k}"]
            asked += sum(("instruction" in r) + ("response" in r) for r in record)
            _advance(batch, k, record, failures)
        for s, r in zip(batch, steps[f"{b}/rank"]):
            if not s.responses:
                failures[f"quality: {R_NO_RESPONSE}"] += 1
            for kind, chain, methods in (("complexity", s.instructions, s.instruction_methods),
                                         ("quality", s.responses, s.response_methods)):
                if not chain:
                    continue
                reply = r.get(kind)
                if len(chain) < 2:
                    scores, reasons = [None] * len(chain), [R_NOTHING_TO_RANK] * len(chain)
                elif reply is None:
                    scores, reasons = [None] * len(chain), [f"judge: {R_TOO_LONG}"] * len(chain)
                else:
                    parsed = parse_rank_scores(reply, len(chain))
                    scores, reasons = parsed.scores, parsed.reasons
                asked += len(chain) >= 2
                for v, (text, method, score, reason) in enumerate(zip(chain, methods, scores, reasons)):
                    if score is None:
                        nulls[kind][reason or "?"] += 1
                    else:
                        scored[kind] += 1
                    complexity = kind == "complexity"
                    # an evolved query holds the seed's input (the rewriter was told to keep it): no input field;
                    # the seed row keeps its own fields, so its text is the pool's
                    evolved_query = complexity and v > 0
                    rows.append({
                        "id": f"{s.id}#{kind[0]}{v}", "seed_id": s.id, "kind": kind, "variant": v, "method": method,
                        "instruction": text if evolved_query else s.instruction,
                        "input": "" if evolved_query else s.input,
                        "output": "" if complexity else text,
                        "complexity_label": score if complexity else None,
                        "quality_label": None if complexity else score,
                        "label_reason": reason, "judge_said": reply,
                    })
    frame = pl.DataFrame(rows, schema=EVOLVED_SCHEMA)
    counts = {"seeds": len(items), "rounds": rounds, "generations": asked,
              "failed_generations": dict(failures),
              "labels": {k: {"scored": scored[k], "null": dict(nulls[k])} for k in ("complexity", "quality")}}
    return frame, counts


# --------------------------------------------------------------------------- scorer training examples


def scorer_rows(rows: pl.DataFrame, task: str, *, label: str = "") -> tuple[pl.DataFrame, int]:
    """The rows `train(..., task=TASK)` learns from: those with a `TASK_label`, checked to be a digit 1-6
    (the six tokens DEITA's scorers read); and how many had no label."""
    col = f"{task}_label"
    where = f"{label}: " if label else ""
    if col not in rows.columns:
        raise TamisError(f"{where}train(..., task={task!r}) needs a `{col}` column in its dataset (evolve(...) "
                         f"makes one); it has {', '.join(rows.columns)}")
    labelled = rows.filter(pl.col(col).is_not_null())
    bad = labelled.filter(~pl.col(col).cast(pl.Float64, strict=False).is_in([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    if bad.height:
        r = bad.row(0, named=True)
        raise TamisError(f"{where}row id {r.get('id')!r}: {col} = {r[col]!r} is not a whole score 1-6 "
                         f"(DEITA's scorers answer one digit 1-6); {bad.height} such row(s)")
    if labelled.height == 0:
        raise TamisError(f"{where}no row has a `{col}` to train on ({rows.height} row(s), all null)")
    return labelled, rows.height - labelled.height


def scorer_examples(lm: Any, rows: pl.DataFrame, task: str, max_length: int) -> tuple[list[Any], dict[str, int]]:
    """Training sequences for a DEITA scorer: the exact prompt the `complexity`/`quality` scorer reads
    (encoded as `digit_scores` encodes it, special tokens included), then the label's digit token, the only
    labelled position. Encoded here rather than as prompt+answer text: a tokenizer may merge the prompt's
    trailing space with the digit (" 3"), and the scorer reads the digit at the position after the prompt's
    own tokens. A prompt that does not fit `max_length` is skipped and counted (a cut prompt would teach
    another prompt)."""
    from tamis.runtime.digit_scorers import DIGIT_TEMPLATES, digit_ids
    from tamis.runtime.training import IGNORE_INDEX, R_PROMPT_TOO_LONG, TrainingExample

    digits = digit_ids(lm.tokenizer)
    records = list(rows.iter_rows(named=True))
    texts = [DIGIT_TEMPLATES[task].format(instruction=user_query(r), output=row_text(r, "output")) for r in records]
    encoded = list(lm.tokenizer(texts)["input_ids"]) if texts else []
    examples, skipped = [], Counter()
    for i, (r, ids) in enumerate(zip(records, encoded)):
        if len(ids) + 1 > max_length:
            skipped[R_PROMPT_TOO_LONG] += 1
            continue
        target = digits[int(r[f"{task}_label"]) - 1]
        examples.append(TrainingExample(i, [*ids, target], [IGNORE_INDEX] * len(ids) + [target]))
    return examples, dict(skipped)
