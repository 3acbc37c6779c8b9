"""Row content hashes: the one definition of content ids and score-cache row keys.

A row's hash (scheme ``SCHEME``) is XXH3-128 twice over:

1. each field, in the order given, is hashed on its own: XXH3-128 of the field's
   UTF-8 text (a string as it is; any other value as its JSON text,
   ``json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)``),
   written as its 32 lowercase hex digits (XXH3's canonical, big-endian form); a null
   field is ``-``;
2. the row's hash is XXH3-128 of ``name1=h1|name2=h2|…`` (ASCII), in the same 32-hex form.

A content id is the first 16 hex digits of the hash over instruction, input and
output; a cache row key is all 32 over the content columns a frame has. Field names
are part of the hash, so the same texts under other columns never share a key.

Why this form: both steps are one native pass per column over a whole frame (the
`polars-hash` plugin: ~0.7 s of CPU for a million Alpaca rows, where the earlier
blake2b of each row's JSON text took ~2.5–3.3 s, one Python-level call per row), and
the scalar definition (`text_hash`, the `xxhash` package, XXH3's reference bindings)
is a few lines anyone can recompute. Where the plugin cannot load (a Polars it was
not built for), `row_hashes` computes the same hashes with `xxhash`, row by row.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Iterable, Sequence

import polars as pl
import xxhash

__all__ = ["SCHEME", "row_hashes", "text_hash"]

SCHEME = "xxh3-128/v2"  # part of every cache key: changing the definition must change it

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
    """The `polars-hash` plugin if it loads and agrees with `text_hash` on a probe row, else None."""
    try:
        import polars_hash as plh

        probe = pl.DataFrame({"a": ["x é🙂"], "b": [None]}, schema={"a": pl.String, "b": pl.String})
        hexed = [_hex(plh.col(c)).fill_null(pl.lit(_NULL)) for c in ("a", "b")]
        got = probe.select(pl.concat_str([pl.concat_str([pl.lit(f"{c}="), h]) for c, h in zip("ab", hexed)],
                                         separator="|").alias("p")).select(_hex(plh.col("p"))).item()
    except Exception:  # noqa: BLE001 - a plugin built for another Polars: the exact row-by-row path
        return None
    return plh if got == text_hash([("a", "x é🙂"), ("b", None)]) else None
