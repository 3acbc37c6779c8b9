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
