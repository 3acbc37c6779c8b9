"""A pool read through Ray Data, never by the driver: JSONL (`ray.data.read_text`, each batch of lines
parsed by the same Polars reader, with the same schema, as the local engine's fast path) and Parquet
(`ray.data.read_parquet`). Each batch is checked and normalised by the local loader's own per-frame
functions (`tamis.runtime.data.frame_fields`, `frame_is_plain`, `frame_flags`, the per-record check of
a flagged row); a batch those cannot vouch for (a bad row, a conversation, a field of several types, a
value the schema refuses) makes the whole run fall back to the driver's loader, which names every
problem with its line. Ids are the loader's: the row's own, else its content id; repeated ids (which
the loader renames in file order) also mean the driver's loader. Then each row gets its position in
the pool (`POS`), from the blocks' sizes in order: ties in a ranking are broken by it, exactly as the
local engine's stable sort breaks them.
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
_HASH = "⟨id hash⟩"  # a 64-bit hash of the id, to find repeated ids without gathering the ids
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
    """The pool as a materialised Ray dataset in file order: the canonical columns, the kept fields,
    and POS. Returns (dataset, rows)."""
    import numpy as np
    import ray
    import ray.data

    if spec.container == "jsonl":
        ds = ray.data.read_text(spec.path, drop_empty_lines=True)
    else:
        ds = ray.data.read_parquet(spec.path)
    ds = ds.map_batches(_normalise_batch, fn_kwargs={"spec": spec}, batch_format="pyarrow", batch_size=None)
    done = _checked_run(ds.materialize)
    number = ray.remote(_number_block).options(num_returns=2)
    refs, hashes, offset = [], [], 0
    for bundle in done.iter_internal_ref_bundles():
        for entry in bundle.blocks:  # (ref, metadata): a BlockEntry in Ray 2.60, a pair before
            block, meta = (entry.ref, entry.metadata) if hasattr(entry, "ref") else entry
            if limit is not None and offset >= limit:
                break
            out, h = number.remote(block, offset, limit)
            refs.append(out)
            hashes.append(h)
            offset += meta.num_rows
    seen = np.concatenate(_checked_run(lambda: ray.get(hashes))) if hashes else np.empty(0, dtype=np.uint64)
    if len(np.unique(seen)) != len(seen):
        raise NeedsDriver("repeated ids (the loader renames them x#2, x#3 … in file order)")
    return ray.data.from_arrow_refs(refs), len(seen)


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


def _normalise_batch(batch, spec: PoolSpec):
    """One batch of raw records (JSONL lines, or Parquet rows) → canonical rows, as the local loader."""
    from tamis.runtime import data as d

    lines: list[str] | None = None
    if spec.container == "jsonl":
        lines = [line for line in batch.column("text").to_pylist() if line.strip()]
        try:
            raw = pl.read_ndjson(io.BytesIO("\n".join(lines).encode("utf-8")), schema=spec.schema)
        except d._POLARS_ERRORS as err:
            _needs(f"a record Polars' reader refuses with the first records' types ({str(err).splitlines()[0]})")
    else:
        raw = pl.from_arrow(batch)
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
    return out.with_columns(pl.col("id").hash(seed=0).alias(_HASH)).to_arrow()


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


def _number_block(block, offset: int, limit: int | None):
    """The block with each row's pool position; and its ids' hashes (8 bytes a row, for the driver)."""
    frame = pl.from_arrow(block)
    frame = frame.with_columns(pl.int_range(offset, offset + frame.height, dtype=pl.Int64).alias(POS))
    if limit is not None:
        frame = frame.head(max(0, limit - offset))
    return frame.drop(_HASH).to_arrow(), frame[_HASH].to_numpy()
