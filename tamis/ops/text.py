"""Cheap text statistics (no model): computed on every run, never cached."""

from __future__ import annotations

import polars as pl

from tamis.ops.kernel import kernel

_FLOAT = {"value": pl.Float64}
_MAIN = {"value": ""}


@kernel("scorer", "length", schema=_FLOAT, names=_MAIN)
def length(rows: pl.DataFrame, model: None, field: str, unit: str) -> dict:
    from tamis.runtime import text_scorers

    return {"value": text_scorers.length(rows, field, unit)}


@kernel("scorer", "mtld", schema={"value": pl.Float64, "reason": pl.String}, names={"value": "", "reason": "_reason"})
def mtld(rows: pl.DataFrame, model: None, field: str, threshold: float) -> dict:
    from tamis.runtime import text_scorers

    value = text_scorers.mtld(rows, field, threshold)
    return {"value": value, "reason": pl.select(pl.when(value.is_null()).then(pl.lit(f"no words in {field}"))
                                                  .otherwise(None).alias("reason"))["reason"]}
