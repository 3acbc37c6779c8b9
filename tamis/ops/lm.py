"""Answer-loss scorers of a causal LM (Cherry's IFD, Superfiltering's ratio, loss, perplexity).

One kernel each, all through `tamis.runtime.lm_scoring.score_answers`. The cached columns
are the same for the three (value, the two losses, the reason), so a loss and an IFD of
one model share nothing but their code.
"""

from __future__ import annotations

import polars as pl

from tamis.ops.kernel import ExecOptions, Resources, kernel

_SCHEMA = {"value": pl.Float64, "cond": pl.Float64, "direct": pl.Float64, "reason": pl.String}
_KEY = ("form", "template", "max_length", "turns")
_GPU = Resources(device="any", memory_per_row=4 << 20)  # activations of one ~512-token row, answer logits only


def _score(rows: pl.DataFrame, lm, metric: str, options: ExecOptions, template: str, max_length: int, turns: str,
           form: str | None = None) -> dict:
    from tamis.runtime.lm_scoring import score_answers

    table = score_answers(lm, rows, metric=metric, ifd_form=form or "loss_ratio", template=template,
                          max_length=max_length, combine=turns, batch_tokens=options.batch_tokens,
                          progress=options.progress)
    return {"value": table.value, "cond": table.cond_loss, "direct": table.direct_loss, "reason": table.reason}


@kernel("scorer", "ifd", cached=True, key_params=_KEY, schema=_SCHEMA, resources=_GPU,
        names={"value": "", "cond": "_cond", "direct": "_direct", "reason": "_reason"})
def ifd(rows, model, form, template, max_length, turns, options: ExecOptions) -> dict:
    return _score(rows, model, "ifd", options, template, max_length, turns, form)


@kernel("scorer", "loss", cached=True, key_params=_KEY, schema=_SCHEMA, resources=_GPU,
        names={"value": "", "reason": "_reason"})
def loss(rows, model, template, max_length, turns, options: ExecOptions) -> dict:
    return _score(rows, model, "loss", options, template, max_length, turns)


@kernel("scorer", "ppl", cached=True, key_params=_KEY, schema=_SCHEMA, resources=_GPU,
        names={"value": "", "reason": "_reason"})
def ppl(rows, model, template, max_length, turns, options: ExecOptions) -> dict:
    return _score(rows, model, "ppl", options, template, max_length, turns)


# --------------------------------------------------------------------------- Nuggets


def _anchors_key(params) -> dict:
    from tamis.runtime.cache import CONTENT_COLUMNS, data_fingerprint

    anchors = params["anchors"]
    # the anchors' content in order (not their ids): each value of the vector is one anchor's loss
    return {"anchors": data_fingerprint(anchors, [c for c in CONTENT_COLUMNS if c in anchors.columns]),
            "prompt": "nuggets-sp-v1"}


@kernel("scorer", "icl_loss", cached=True, key_params=("max_length",), key_extra=_anchors_key,
        schema={"value": pl.List(pl.Float64), "reason": pl.String}, names={"value": "", "reason": "_reason"},
        resources=Resources(device="any", memory_per_row=64 << 20))
def icl_loss(rows, model, anchors, max_length, options: ExecOptions) -> dict:
    """Nuggets: each anchor's mean answer loss with this row as the one-shot demonstration,
    one value per anchor in the anchors' order (NaN where the anchor has nothing to score)."""
    from tamis.runtime.nuggets import one_shot_losses

    values, reasons = one_shot_losses(model, rows, anchors, scorer=_one_shot_scorer(model, anchors, max_length,
                                                                                    options.batch_tokens),
                                      progress=options.progress)
    return {"value": pl.Series([None if v is None else v.tolist() for v in values], dtype=pl.List(pl.Float64)),
            "reason": reasons}


_ONE_SHOT: dict = {}  # the last anchor set planned: once per run, not once per cache chunk


def _one_shot_scorer(model, anchors: pl.DataFrame, max_length: int, batch_tokens: int | None):
    from tamis.runtime.nuggets import OneShotScorer

    key = (id(model), _anchors_key({"anchors": anchors})["anchors"], max_length, batch_tokens)
    if _ONE_SHOT.get("key") != key:
        _ONE_SHOT.update(key=key, scorer=OneShotScorer(model, anchors, max_length=max_length,
                                                       batch_tokens=batch_tokens))
    return _ONE_SHOT["scorer"]
