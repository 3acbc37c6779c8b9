"""Row content hashes: the one definition of content ids and score-cache row keys.

A row's hash is XXH3-128 twice over:

1. each field, in the order given, is hashed on its own: XXH3-128 of the field's
   UTF-8 text (a string as it is; any other value as its JSON text,
   ``json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)``),
   written as its 32 lowercase hex digits (XXH3's canonical, big-endian form); a null
   field is ``-``;
2. the row's hash is XXH3-128 of ``name1=h1|name2=h2|…`` (ASCII), in the same 32-hex form.

A content id is the first 16 hex digits of the hash over instruction, input and
output; a cache row key is all 32 over the content columns a frame has. Field names
are part of the hash, so the same texts under other columns never share a key. A
change to this definition must bump the score cache's format (`tamis.runtime.cache`),
as this one did (`tamis-cache-v2`).

Why this form: both steps are one native pass per column over a whole frame (the
`polars-hash` plugin: ~0.7 s of CPU for a million Alpaca rows, where the earlier
blake2b of each row's JSON text took ~2.5–3.3 s, one Python-level call per row), and
the scalar definition (`text_hash`, the `xxhash` package, XXH3's reference bindings)
is a few lines anyone can recompute. Where the plugin cannot load (a Polars it was
not built for), `row_hashes` computes the same hashes with `xxhash`, row by row, and
says so once.
"""

from __future__ import annotations

import functools
import json
import warnings
from typing import Any, Iterable, Sequence

import polars as pl
import xxhash

__all__ = ["row_hashes", "text_hash"]

_NULL = "-"
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def text_hash(fields: Iterable[tuple[str, Any]]) -> str:
    """The 32-hex hash of one row given as (name, value) pairs (the definition above)."""
    parts = []
    for name, value in fields:
        if value is None:
            digest = _NULL
        else:
            text = value if isinstance(value, str) else _JSON.encode(value)
            digest = xxhash.xxh3_128_hexdigest(text.encode("utf-8"))
        parts.append(f"{name}={digest}")
    return xxhash.xxh3_128_hexdigest("|".join(parts).encode("ascii"))


CHUNK = 1 << 16  # rows hashed at a time: the hex digests and payloads of a chunk are ~12 MB


def row_hashes(frame: pl.DataFrame, columns: Sequence[str], name: str = "hash", chunk: int | None = None) -> pl.Series:
    """`text_hash` of every row of `frame` over `columns`, as a String series: column-wise, `chunk`
    rows at a time (bounded temporaries whatever the pool's size)."""
    columns, chunk = list(columns), chunk or CHUNK
    parts = [_hashes(frame.slice(start, chunk), columns, name) for start in range(0, frame.height, chunk)]
    return pl.concat(parts) if parts else pl.Series(name, [], dtype=pl.String)


def _hashes(frame: pl.DataFrame, columns: list[str], name: str) -> pl.Series:
    texts = frame.select(_as_text(frame, c) for c in columns)
    plugin = _plugin()
    if plugin is None:
        return _row_hashes_by_row(texts, columns, name)
    return _column_wise(plugin, texts, columns, name)


def _column_wise(plugin: Any, texts: pl.DataFrame, columns: list[str], name: str) -> pl.Series:
    """Both steps of the definition through the plugin, over string columns `texts`."""
    hexed = (_hex(plugin.col(c)).fill_null(pl.lit(_NULL)) for c in columns)
    payload = pl.concat_str([pl.concat_str([pl.lit(f"{c}="), h]) for c, h in zip(columns, hexed)], separator="|")
    return texts.select(payload.alias(name)).select(_hex(plugin.col(name)).alias(name)).to_series()


def _as_text(frame: pl.DataFrame, column: str) -> pl.Expr:
    """The column as the text step 1 hashes: strings as they are, other values as JSON text (row by
    row: only conversation columns, lists of messages, take this path)."""
    dtype = frame.schema[column]
    if dtype in (pl.String, pl.Null):
        return pl.col(column).cast(pl.String)
    texts = [None if v is None else _JSON.encode(v) for v in frame[column].to_list()]  # the definition's JSON text
    return pl.lit(pl.Series(column, texts, dtype=pl.String)).alias(column)


def _hex(expr: Any) -> pl.Expr:
    return expr.nchash.xxh3_128(return_binary=True, byte_order="big").bin.encode("hex")


def _row_hashes_by_row(texts: pl.DataFrame, columns: list[str], name: str) -> pl.Series:
    return pl.Series(name, [text_hash(zip(columns, row)) for row in texts.iter_rows()], dtype=pl.String)


@functools.lru_cache(maxsize=1)
def _plugin() -> Any:
    """The `polars-hash` plugin if it loads and agrees with `text_hash` on a probe row, else None
    (with a warning: the row-by-row path gives the same hashes, several times slower)."""
    probe = pl.DataFrame({"a": ["x é🙂"], "b": [None]}, schema={"a": pl.String, "b": pl.String})
    try:
        import polars_hash as plh

        got = _column_wise(plh, probe, ["a", "b"], "p").item()
    except Exception as err:  # noqa: BLE001 - a plugin built for another Polars
        why = f"it does not load with Polars {pl.__version__} ({type(err).__name__}: {err})"
    else:
        if got == text_hash([("a", "x é🙂"), ("b", None)]):
            return plh
        why = "it disagrees with xxhash on a probe row"
    warnings.warn(f"polars-hash: {why}; row hashes (content ids, cache keys) are computed row by row with "
                  "xxhash instead: the same values, several times slower", RuntimeWarning, stacklevel=2)
    return None
