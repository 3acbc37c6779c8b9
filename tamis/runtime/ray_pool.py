"""A pool read through Ray Data, never by the driver (JSONL and Parquet).

The driver plans chunks of the file from its footer (Parquet: row ranges aligned to row groups) or a
few small reads (JSONL: byte ranges cut at line starts); Ray Data's workers read them
(`ray.data.from_items` + `map_batches`) with the local loader's own readers (Polars' `scan_parquet`;
`read_ndjson` with the schema the loader derives from the first 100 records), then check and
normalise each chunk with the loader's own per-frame functions (`tamis.runtime.data.frame_fields`,
`frame_is_plain`, `frame_flags`, and the per-record check of a flagged row). A chunk those cannot
vouch for (a bad row, a conversation, a field of several types, a value the schema refuses) makes the
run fall back to the driver's loader, which names every problem with its line. Ids are the loader's:
the row's own, else its content id; repeated ids (which the loader renames in file order) also mean
the driver's loader. Each row then gets its position in the pool (POS) from its chunk's offset and
its place in the chunk: ties in a ranking are broken by it, exactly as the local engine's stable sort
breaks them. (Ray's own `read_parquet`/`read_text` give no row numbers, and their blocks may arrive
in any order.)
"""

from __future__ import annotations

import codecs
import io
import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import polars as pl

POS = "⟨pos⟩"  # the row's position in the pool (0-based, file order)
_HASH = "⟨id hash⟩"
_CHUNK, _ROW = "⟨chunk⟩", "⟨row in chunk⟩"  # where a row was read: which chunk of the file, its place there  # a 64-bit hash of the id, to find repeated ids without gathering the ids
DRIVER = "⟨needs the driver⟩"  # marks the error a batch raises when the driver's loader must take over


class NeedsDriver(Exception):
    """The pool (or the recipe) needs the driver's path; the text says why."""


@dataclass(frozen=True)
class PoolSpec:
    path: str
    container: str  # "jsonl" | "parquet"
    opts: Any  # tamis.runtime.data._Options, with the JSON window's extra fields
    schema: dict | None  # JSONL: the Polars schema every batch is read with


def pool_spec(pool: str, pool_format: str, columns: dict | None) -> PoolSpec:
    """How Ray Data reads this pool, decided from its extension and first records (never the whole
    file); NeedsDriver when it is a pool only the driver's loader reads."""
    from tamis.runtime import data as d

    path = Path(pool)
    opts = d._options(pool_format, columns, "first")
    d._check_file(path)
    container, compression = d._container(path, pool_format)
    if compression is not None:
        raise NeedsDriver(f"a {compression}-compressed pool")
    if container not in ("jsonl", "parquet"):
        raise NeedsDriver(f"a {container} pool (Ray Data reads JSONL and Parquet pools)")
    if opts.schema == "sharegpt":
        raise NeedsDriver("a conversation (ShareGPT) pool")
    if container == "parquet":
        return PoolSpec(str(path), container, opts, None)
    with open(path, "rb") as fh:
        if fh.read(3) == codecs.BOM_UTF8:
            raise NeedsDriver("a JSONL pool with a byte-order mark")
    window = d._json_window(path, container)
    if not d._window_is_plain(opts, window):
        raise NeedsDriver("conversations, or a field of several types, in the pool's first records")
    opts = d._with_window(opts, window)
    return PoolSpec(str(path), container, opts, d._json_schema(opts, window, int_ids=True))


def read_pool(spec: PoolSpec, limit: int | None):
    """The pool as a materialised Ray dataset: the canonical columns, the kept fields, and POS.
    Returns (dataset, rows).

    The driver plans chunks of the file (Parquet: row-group-aligned row ranges from the footer; JSONL:
    byte ranges cut at line starts, a few small reads) and Ray Data reads them on its workers
    (`from_items` + `map_batches`): each chunk's rows carry their chunk and their place in it, so the
    positions come from the file, whatever order Ray's blocks arrive in."""
    import numpy as np
    import ray
    import ray.data

    chunks = _chunks(spec)
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    ds = ds.map_batches(_read_chunk, fn_kwargs={"spec": spec}, batch_format="pyarrow", batch_size=1)
    done = _checked_run(ds.materialize)
    counts = pl.DataFrame(done.map_batches(_chunk_rows, batch_format="pyarrow", batch_size=None).take_all(),
                          schema={_CHUNK: pl.Int64, "n": pl.Int64})
    per = counts.group_by(_CHUNK).agg(pl.col("n").max()).sort(_CHUNK)
    offsets = dict(zip(per[_CHUNK].to_list(), (per["n"].cum_sum() - per["n"]).to_list()))
    numbered = done.map_batches(_number, fn_kwargs={"offsets": offsets, "limit": limit}, batch_format="pyarrow")
    numbered = _checked_run(numbered.materialize)
    parts = [b[_HASH].to_numpy() for b in numbered.select_columns([_HASH]).iter_batches(batch_size=None,
                                                                                        batch_format="pyarrow")]
    seen = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)
    if len(np.unique(seen)) != len(seen):
        raise NeedsDriver("repeated ids (the loader renames them x#2, x#3 … in file order)")
    return numbered.drop_columns([_HASH]).materialize(), len(seen)


def _chunks(spec: PoolSpec, rows_per_chunk: int = 100_000, bytes_per_chunk: int = 32 << 20) -> list[dict]:
    """The file's chunks, in file order (each read by one Ray task)."""
    import os

    if spec.container == "parquet":
        import pyarrow.parquet as pq

        out, start, size = [], 0, 0
        meta = pq.ParquetFile(spec.path).metadata
        for i in range(meta.num_row_groups):
            size += meta.row_group(i).num_rows
            if size >= rows_per_chunk or i == meta.num_row_groups - 1:
                out.append({"chunk": len(out), "start": start, "rows": size})
                start, size = start + size, 0
        return out or [{"chunk": 0, "start": 0, "rows": 0}]
    total = os.path.getsize(spec.path)
    cuts = [0]
    with open(spec.path, "rb") as fh:
        for at in range(bytes_per_chunk, total, bytes_per_chunk):
            fh.seek(at)
            fh.readline()  # to the next line start
            if fh.tell() > cuts[-1] and fh.tell() < total:
                cuts.append(fh.tell())
    cuts.append(total)
    return [{"chunk": i, "start": a, "rows": b - a} for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]


def _checked_run(fn):
    """Run a Ray step of the read; a batch that needs the driver, or any reading error, says so."""
    import logging

    import ray

    quiet = logging.getLogger("ray.data")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # a batch that needs the driver is no error to print: the driver takes over
    try:
        return fn()
    except ray.exceptions.RayError as err:
        from tamis.runtime.ray_engine import _cause

        why = _cause(err)
        raise NeedsDriver(why.split(DRIVER, 1)[-1].strip(" :") if DRIVER in why else f"reading failed ({why})") \
            from None
    finally:
        quiet.setLevel(level)


# --------------------------------------------------------------------------- on the workers


def _read_chunk(batch, spec: PoolSpec):
    """Read one chunk of the file (JSONL: its lines; Parquet: its rows, by Polars' reader as the local
    loader reads them) and normalise it; each row with its chunk and its place in the chunk."""
    chunk, start, size = (batch.column(c)[0].as_py() for c in ("chunk", "start", "rows"))
    if spec.container == "parquet":
        raw = pl.scan_parquet(spec.path).slice(start, size).collect()
        out = _normalise(raw, spec, None)
    else:
        with open(spec.path, "rb") as fh:
            fh.seek(start)
            text = fh.read(size).decode("utf-8")  # invalid UTF-8: the driver's loader names the line
        out = _normalise(None, spec, [line for line in text.split("\n") if line.strip()])
    return out.with_columns(pl.lit(chunk, pl.Int64).alias(_CHUNK),
                            pl.int_range(out.height, dtype=pl.Int64).alias(_ROW)).to_arrow()


def _normalise(raw: pl.DataFrame | None, spec: PoolSpec, lines: list[str] | None) -> pl.DataFrame:
    """Raw records (JSONL lines, or a Parquet frame) → canonical rows, as the local loader."""
    from tamis.runtime import data as d

    if lines is not None and not lines:
        raw = pl.DataFrame(schema=spec.schema)
    elif lines is not None:
        try:
            raw = pl.read_ndjson(io.BytesIO("\n".join(lines).encode("utf-8")), schema=spec.schema)
        except d._POLARS_ERRORS as err:
            _needs(f"a record Polars' reader refuses with the first records' types ({str(err).splitlines()[0]})")
    json_values = lines is not None
    opts = spec.opts
    sources, _, extras = d.frame_fields(raw, opts)
    if not json_values:
        opts = replace(opts, extras={name: raw.schema[name] for name in extras})
    else:
        _check_text_extras(raw, extras, lines)
    if not d.frame_is_plain(raw, sources, opts, json_values):
        _needs("rows the vectorised checks cannot vouch for (conversations, or text fields of other types)")
    canon, _, flagged, _ = d.frame_flags(raw, sources, extras, json_values)
    if flagged.any():
        if lines is None:
            _needs("a row with a missing or blank text field")
        fixes = {}
        for i in flagged.arg_true().to_list():  # the loader's own per-record check, on this row's line
            rows, issues = d._normalise(d._parse_jsonl_line(lines[i].encode("utf-8"), 0), opts, Counter())
            if issues or len(rows) != 1 or rows[0]["messages"] is not None:
                _needs("a bad record (" + (issues[0].key if issues else "a conversation") + ")")
            fixes[i] = rows[0]
        canon = d._apply_fixes(canon, fixes)
    ids = canon["id"]
    missing = ids.is_null()
    if missing.any():
        ids = ids.clone().scatter(missing.arg_true(), d.content_ids(canon.filter(missing)))
    out = canon.with_columns(ids.alias("id")).select(["id", *d._TEXT]).hstack([raw[name] for name in extras])
    return out.with_columns(pl.col("id").hash(seed=0).alias(_HASH))


def _check_text_extras(raw: pl.DataFrame, extras: list[str], lines: list[str]) -> None:
    """A kept text field holding a value that looks like a number, boolean, list or object may not have
    been a string in the file (Polars reads 5 as "5"): such rows' lines are asked, as the loader asks."""
    from tamis.runtime import data as d

    for name in (n for n in extras if raw.schema[n] == pl.String):
        suspect = raw[name].str.contains(d._COERCED_EXTRA).fill_null(False)
        for i in suspect.arg_true().to_list():
            if not isinstance(json.loads(lines[i]).get(name), str):
                _needs(f"field {name!r} holds values of several types")


def _needs(why: str):
    raise RuntimeError(f"{DRIVER}: {why}")


def _chunk_rows(batch):
    """Rows of each chunk seen in this block (a chunk's rows may span blocks: the largest place + 1)."""
    f = pl.from_arrow(batch)
    return f.group_by(_CHUNK).agg((pl.col(_ROW).max() + 1).alias("n")).to_arrow()


def _number(batch, offsets: dict, limit: int | None):
    """Each row's pool position: its chunk's offset plus its place in the chunk."""
    f = pl.from_arrow(batch)
    start = f[_CHUNK].replace_strict(offsets, return_dtype=pl.Int64)
    f = f.with_columns((start + f[_ROW]).alias(POS)).drop(_CHUNK, _ROW)
    return (f.filter(pl.col(POS) < limit) if limit is not None else f).to_arrow()


def batch_frame(batch) -> pl.DataFrame:
    """An Arrow batch as a Polars frame. Ray slices blocks into batches, and Polars cannot read a slice of
    a fixed-size-list column (an embedding) whose rows are all null ("validity mask length must be equal
    to …"); such a batch is copied to a fresh, unsliced one first."""
    try:
        return pl.from_arrow(batch)
    except pl.exceptions.ComputeError:
        import pyarrow as pa

        return pl.from_arrow(batch.take(pa.array(range(batch.num_rows), type=pa.int64())))
