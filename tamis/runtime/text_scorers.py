"""Cheap text statistics: length and MTLD (Instruction-Mining's lexical-diversity indicator)."""

from __future__ import annotations

import re

import polars as pl

_WORD = re.compile(r"\w+(?:'\w+)?")


def _field_text(frame: pl.DataFrame, field: str) -> pl.Series:
    if field == "all":
        return (frame["instruction"] + "\n" + frame["input"] + "\n" + frame["output"]).alias("text")
    return frame[field]


def length(frame: pl.DataFrame, field: str = "output", unit: str = "words") -> pl.Series:
    text = _field_text(frame, field)
    if unit == "chars":
        return text.str.len_chars().cast(pl.Float64)
    return pl.Series([float(len(_WORD.findall(t or ""))) for t in text.to_list()], dtype=pl.Float64)


def _mtld_pass(words: list[str], threshold: float) -> float:
    factors, types, count = 0.0, set(), 0
    for w in words:
        count += 1
        types.add(w)
        if len(types) / count <= threshold:
            factors += 1
            types, count = set(), 0
    if count:  # partial factor for the remainder (McCarthy & Jarvis, 2010)
        ttr = len(types) / count
        factors += (1 - ttr) / (1 - threshold) if ttr < 1 else 0.0
    return len(words) / factors if factors else float(len(words))


def mtld_value(text: str, threshold: float = 0.72) -> float | None:
    words = [w.lower() for w in _WORD.findall(text or "")]
    if not words:
        return None
    return (_mtld_pass(words, threshold) + _mtld_pass(words[::-1], threshold)) / 2


def mtld(frame: pl.DataFrame, field: str = "output", threshold: float = 0.72) -> pl.Series:
    return pl.Series([mtld_value(t, threshold) for t in _field_text(frame, field).to_list()], dtype=pl.Float64)
