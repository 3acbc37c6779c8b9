"""Cheap text statistics: length and MTLD (Instruction-Mining's lexical-diversity indicator).

`length` runs in Polars (`length_expr`): words are counted with the regex the original
Python code used, `\\w+(?:'\\w+)?`, whose `\\w` is rebuilt as an explicit class of the
code points Python's `re` calls word characters, so counts agree to the code point.
"""

from __future__ import annotations

import functools
import re

import polars as pl

_WORD = re.compile(r"\w+(?:'\w+)?")


@functools.lru_cache(maxsize=1)
def _every_code_point() -> str:
    """All of Unicode in one string, surrogates replaced by U+FFFF (neither \\w nor \\s)."""
    import numpy as np

    points = np.arange(0x110000, dtype="<u4")
    points[0xD800:0xE000] = 0xFFFF
    return points.tobytes().decode("utf-32-le")


@functools.lru_cache(maxsize=None)
def python_class(pattern: str) -> str:
    """The body of a Rust-regex character class (for Polars) holding exactly the code
    points that Python's `re` matches with `pattern` (r"\\w", r"\\s"). The two engines'
    Unicode tables differ (Rust's \\w has combining marks and joiners, Python's has
    No digits like ², and their Unicode versions differ), and Python's is the reference."""
    ranges = []
    for m in re.finditer(pattern + "+", _every_code_point()):
        first, last = m.start(), m.end() - 1
        ranges.append(f"\\x{{{first:x}}}" if first == last else f"\\x{{{first:x}}}-\\x{{{last:x}}}")
    return "".join(ranges)


@functools.lru_cache(maxsize=1)
def word_pattern() -> str:
    """`\\w+(?:'\\w+)?` for Polars' regex engine, with Python's `\\w`."""
    word = "[" + python_class(r"\w") + "]"
    return f"{word}+(?:'{word}+)?"


def word_count(expr: pl.Expr) -> pl.Expr:
    """Words in a text column as `len(re.findall(r"\\w+(?:'\\w+)?", text))` counts them
    (null counts 0), computed by Polars."""
    return expr.str.count_matches(word_pattern()).fill_null(0)


def _field_text(frame: pl.DataFrame, field: str) -> pl.Series:
    return frame.select(_field_expr(field).alias("text")).to_series()


def _field_expr(field: str) -> pl.Expr:
    if field == "all":
        return pl.concat_str([pl.col("instruction"), pl.col("input"), pl.col("output")], separator="\n")
    return pl.col(field)


def length_expr(field: str = "output", unit: str = "words") -> pl.Expr:
    """`length` as a Polars expression over a canonical frame (Float64): characters, or
    words as `re.findall(r"\\w+(?:'\\w+)?", text)` counts them, to the code point."""
    text = _field_expr(field)
    if unit == "chars":
        return text.str.len_chars().cast(pl.Float64)
    return word_count(text).cast(pl.Float64)


def length(frame: pl.DataFrame, field: str = "output", unit: str = "words") -> pl.Series:
    return frame.select(length_expr(field, unit).alias("")).to_series()


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
