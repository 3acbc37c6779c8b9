"""`length` in Polars counts words exactly as the original Python regex does."""

from __future__ import annotations

import random
import re

import polars as pl
import pytest

from tamis.runtime import text_scorers
from tamis.runtime.text_scorers import length, length_expr, python_class, word_pattern

WORD = re.compile(r"\w+(?:'\w+)?")


def python_length(texts: list[str | None]) -> list[float]:
    """What `length(..., unit="words")` computed before it moved into Polars."""
    return [float(len(WORD.findall(t or ""))) for t in texts]


def every_code_point() -> list[str]:
    return [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]


def test_word_class_is_pythons_to_the_code_point() -> None:
    chars = every_code_point()
    ours = pl.Series(chars).str.contains("^[" + python_class(r"\w") + "]$").to_list()
    python = [re.fullmatch(r"\w", c) is not None for c in chars]
    assert ours == python
    # the engines really differ, so the rebuilt class is needed: Rust's \w has combining
    # marks and joiners, Python's has digits like ² and ½
    rust = pl.Series(chars).str.contains(r"^\w$").to_list()
    differ = {c for c, a, b in zip(chars, rust, python) if a != b}
    assert {"\u0301", "\u200d", "²", "½"} <= differ


def test_blank_class_is_str_strip() -> None:
    from tamis.runtime.data import _blank_pattern

    chars = every_code_point()
    ours = pl.Series(chars).str.contains(_blank_pattern()).to_list()
    assert ours == [not c.strip() for c in chars]
    assert pl.Series(["", " \t\n\x1c\u3000", " x "]).str.contains(_blank_pattern()).to_list() == [True, True, False]


TRICKY = [
    "", "   ", "don't stop", "l'été c'est 'quoted' words'", "rock'n'roll", "it''s", "'lead trail'",
    "x² ½ ① Ⅳ", "café (e\u0301 combining)", "नमस्ते दुनिया", "한국어 텍스트", "東京は晴れ", "مرحبا بالعالم",
    "emoji 😀👍🏽 zwj 👨‍👩‍👧", "snake_case and ‿tie⁀", "tab\tnew\nline\r\n", "3.14 1,000 -5 e-mail",
    "\u200bzero\u200cwidth\u200djoin", "Ünïcödé ǅ ǈ ᾈ", "\x00nul\x1fctrl\x7f", "a'b'c'd", "''", "_'_",
    "ﬁ ligature ＡＢＣ fullwidth", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math", "🄰 enclosed ⓐ",
]


def test_length_words_equals_python_on_varied_text() -> None:
    rng = random.Random(7)
    alphabet = every_code_point()
    pieces = ["'", " ", "'", "\n", "a", "é"]
    randoms = ["".join(rng.choice(alphabet if rng.random() < 0.6 else pieces) for _ in range(rng.randint(0, 40)))
               for _ in range(3000)]
    texts = TRICKY + randoms + [None]
    frame = pl.DataFrame({"instruction": texts, "input": texts[::-1], "output": texts}, schema={c: pl.String for c in ("instruction", "input", "output")})
    assert length(frame, "output", "words").to_list() == python_length(texts)
    everything = [None if a is None or b is None or c is None else f"{a}\n{b}\n{c}"
                  for a, b, c in zip(texts, texts[::-1], texts)]
    assert length(frame, "all", "words").to_list() == python_length(everything)
    assert frame.select(length_expr("instruction")).to_series().to_list() == python_length(texts)


def test_length_chars_and_dtype() -> None:
    frame = pl.DataFrame({"instruction": ["a"], "input": [""], "output": ["héllo 😀"]})
    assert length(frame, unit="chars").to_list() == [7.0]
    assert length(frame).dtype == pl.Float64 and length(frame).to_list() == [1.0]


def test_word_pattern_is_built_once() -> None:
    assert word_pattern() is word_pattern()
    assert text_scorers.python_class.cache_info().currsize >= 1


@pytest.mark.parametrize("text", TRICKY)
def test_mtld_words_unchanged(text: str) -> None:
    # mtld still tokenises in Python with the same regex; only `length` moved
    value = text_scorers.mtld_value(text)
    words = WORD.findall(text)
    assert (value is None) == (not words)
    if words:
        assert value > 0
