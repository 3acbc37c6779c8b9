"""Instruction-Mining's indicators as scorers: `score knn using M with k=6` and `score reward using encoder("RM")`.

* `knn` — the mean Euclidean distance from each row to its k nearest other rows among the rows the
  stage scores, over the L2-normalised embeddings the engine provides as a scored input (the same
  cached vectors `score embedding` and the diversity samplers read: an encoder's own pooling, an LLM's
  last real token). It depends on every row of the stage, so it is global and never cached per row;
  the embeddings are. A stage with one row gives null (it has no neighbour); with k or fewer rows,
  the mean is over all the others. Math: `tamis.runtime.indicators.knn_mean_distance`.
* `reward` — a sequence-classification reward model's score of (instruction[\\ninput], output), the
  OpenAssistant reward models' form: the pair tokenized together (truncated to 512 tokens, longest
  part first), the single logit (for a two-logit head, logit 1 − logit 0). Cached row by row. The
  model is the stage's `encoder("…")`: its folder is read with AutoModelForSequenceClassification
  and AutoTokenizer (its sentence-transformers loading is never used). A row with an empty response
  is null, with the reason "empty response".
"""

from __future__ import annotations

import polars as pl

from tamis.ops.diversity import _EMB, EMBEDDINGS, _embeddings
from tamis.ops.embedding import sampler_embedding
from tamis.ops.kernel import ExecOptions, Resources, kernel


@kernel("scorer", "knn", mode="global", schema={"value": pl.Float64}, names={"value": ""}, resources=_EMB,
        scored_inputs={EMBEDDINGS: sampler_embedding})
def knn(rows: pl.DataFrame, model, k: int, options: ExecOptions) -> dict:
    """{"value": mean Euclidean distance to the k nearest other rows} (null for a lone row)."""
    from tamis.runtime.indicators import knn_mean_distance
    from tamis.runtime.models import resolve_device

    if rows.height == 0:
        return {"value": pl.Series("value", [], dtype=pl.Float64)}
    emb = _embeddings(rows, model, options)
    got = knn_mean_distance(emb, int(k), device=resolve_device(options.device))
    return {"value": pl.Series("value", got, dtype=pl.Float64).fill_nan(None)}


def _reward_key(params) -> dict:
    from tamis.runtime.indicators import REWARD_VERSION

    return {"reward": REWARD_VERSION}


@kernel("scorer", "reward", cached=True, key_params=(), key_extra=_reward_key,
        schema={"value": pl.Float64, "reason": pl.String}, names={"value": "", "reason": "_reason"},
        resources=Resources(device="any", memory_per_row=4 << 20))
def reward(rows: pl.DataFrame, model, options: ExecOptions) -> dict:
    """{"value": the reward model's score, "reason": null, or why a row has no score}."""
    from tamis.runtime.indicators import RewardModel, reward_scores
    from tamis.runtime.models import resolve_device

    path = getattr(model, "path", None)
    if path is None:
        from tamis.errors import ModelError

        raise ModelError("`score reward` needs a local reward model folder: use encoder(\"NAME\") "
                         "(bound with --model NAME=PATH)")
    device = getattr(model, "device", None) or resolve_device(options.device)
    values, reasons = reward_scores(RewardModel.from_path(str(path), device), rows)
    return {"value": values, "reason": reasons}


def _unieval_key(params) -> dict:
    from tamis.runtime.unieval import UNIEVAL_VERSION

    return {"unieval": UNIEVAL_VERSION}


@kernel("scorer", "unieval", cached=True, key_params=("dimension",), key_extra=_unieval_key,
        schema={"value": pl.Float64}, names={"value": ""},
        resources=Resources(device="any", memory_per_row=8 << 20))
def unieval(rows: pl.DataFrame, model, dimension: str, options: ExecOptions) -> dict:
    """{"value": UniEval's dialogue score of the row's output on `dimension`, in [0, 1]}.

    UniEval (`MingZhong/unieval-dialog`) as its `DialogEvaluator` computes naturalness, coherence and
    understandability: turn-level, the history being instruction[\\ninput] + "\\n\\n" and the response
    the output. Math and prompts: `tamis.runtime.unieval`."""
    from tamis.runtime.models import resolve_device
    from tamis.runtime.unieval import UniEvalScorer, unieval_rows

    if rows.height == 0:
        return {"value": pl.Series("value", [], dtype=pl.Float64)}
    path = getattr(model, "path", None)
    if path is None:
        from tamis.errors import ModelError

        raise ModelError("`score unieval` needs a local UniEval folder: use encoder(\"NAME\") "
                         "(bound with --model NAME=PATH)")
    device = getattr(model, "device", None) or resolve_device(options.device)
    outputs, histories = unieval_rows(rows)
    got = UniEvalScorer.from_path(str(path), device).score(str(dimension), outputs, histories)
    return {"value": pl.Series("value", got, dtype=pl.Float64)}
