"""DEITA's complexity and quality scores: the expected digit from six LM-head rows at the last token."""

from __future__ import annotations

import polars as pl

from tamis.ops.kernel import ExecOptions, Resources, kernel

_SCHEMA = {"value": pl.Float64, "reason": pl.String}
_NAMES = {"value": "", "reason": "_reason"}
_GPU = Resources(device="any", memory_per_row=16 << 20)


def _template(kind: str):
    def key(params) -> dict:
        from tamis.runtime.digit_scorers import DIGIT_TEMPLATES

        return {"template": DIGIT_TEMPLATES[kind]}
    return key


def _scores(rows, lm, kind: str, max_length: int, options: ExecOptions) -> dict:
    from tamis.runtime.digit_scorers import digit_scores

    got = digit_scores(lm, rows, kind, max_length=max_length, progress=options.progress)
    return {"value": got.value, "reason": got.reason}


@kernel("scorer", "complexity", cached=True, key_params=("max_length",), key_extra=_template("complexity"),
        schema=_SCHEMA, names=_NAMES, resources=_GPU)
def complexity(rows, model, max_length: int, options: ExecOptions) -> dict:
    return _scores(rows, model, "complexity", max_length, options)


@kernel("scorer", "quality", cached=True, key_params=("max_length",), key_extra=_template("quality"),
        schema=_SCHEMA, names=_NAMES, resources=_GPU)
def quality(rows, model, max_length: int, options: ExecOptions) -> dict:
    return _scores(rows, model, "quality", max_length, options)
