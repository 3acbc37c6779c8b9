"""A content-addressed cache for per-row scores and trained artifacts.

Scoring a pool with a model is the expensive part of a recipe, so results are
cached under a key that says *what* was computed — operator, its semantic
parameters, model fingerprint, prompt template, truncation, data content — and
never *when* (no run ids, no timestamps). Two runs that ask for the same thing
share the result; changing anything that affects a score changes the key.

Scores are persisted **shard by shard**: the executor scores the missing ids in
chunks and `put`s each chunk as soon as it is done, each chunk one atomically
written Parquet file. A killed run loses at most the chunk in flight; the next run
`get`s what is there and scores only the rest.

Trained artifacts (a warmed-up model, a trained scorer) are built in a temporary
directory and renamed into place only on success, so a killed training never
leaves a half artifact that a later run would trust.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import weakref
from pathlib import Path, PurePath
from typing import Any, Iterable, Mapping, Sequence

import polars as pl

from tamis.runtime.outputs import atomic_dir, fsync_dir, fsync_file

from tamis.errors import TamisError

__all__ = [
    "ArtifactCache",
    "Cache",
    "CacheError",
    "ScoreCache",
    "data_fingerprint",
    "default_cache_root",
    "fingerprint",
    "open_cache",
    "row_content_hashes",
]

_VERSION = "tamis-cache-v1"  # bump when the meaning of cached bytes changes
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHARD = re.compile(r"^shard-(\d+)(?:-[0-9a-f]+)?\.parquet$")
CONTENT_COLUMNS: tuple[str, ...] = ("instruction", "input", "output", "messages")


class CacheError(TamisError):
    """The cache was used wrongly (bad key, bad rows) or holds unreadable data."""


# --------------------------------------------------------------------------- keys


def default_cache_root() -> Path:
    """$TAMIS_CACHE_DIR, else $XDG_CACHE_HOME/tamis, else ~/.cache/tamis."""
    explicit = os.environ.get("TAMIS_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tamis"


def fingerprint(obj: Any) -> str:
    """A stable hex digest of a JSON-canonicalised structure (sorted keys).

    Stable across runs, processes and machines: no `hash()`, no object ids, no
    `repr` of arbitrary objects. Types without an obvious canonical form raise
    rather than being stringified, because a key that silently depends on a memory
    address would never hit (or worse, would collide).
    """
    text = json.dumps(
        [_VERSION, _canonical(obj)],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=True,
    )
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _canonical(obj: Any) -> Any:
    """Reduce `obj` to JSON types; tagged where two types would otherwise collide."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return _canonical_dict(obj)
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [_canonical(v) for v in obj]
        return {"__set__": sorted(items, key=lambda v: json.dumps(v, sort_keys=True))}
    if isinstance(obj, bytes):
        return {"__bytes__": obj.hex()}
    if isinstance(obj, PurePath):
        return {"__path__": obj.as_posix()}
    if isinstance(obj, enum.Enum):
        return {"__enum__": f"{type(obj).__qualname__}.{obj.name}"}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return {"__dataclass__": type(obj).__qualname__, "fields": _canonical_dict(fields)}
    if hasattr(obj, "model_dump"):  # pydantic models
        return {"__model__": type(obj).__qualname__, "fields": _canonical(obj.model_dump())}
    raise CacheError(f"cannot fingerprint a {type(obj).__qualname__}; pass its content (e.g. a dict)")


def _canonical_dict(obj: dict[Any, Any]) -> dict[str, Any]:
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise CacheError(f"cannot fingerprint dict keys that are not strings: {bad[:3]!r}")
    return {k: _canonical(v) for k, v in obj.items()}


def row_content_hashes(frame: pl.DataFrame, columns: Sequence[str] = CONTENT_COLUMNS) -> list[str]:
    """One stable hash per row of its text content (the canonical content columns
    present). Use these as score-cache row keys when ids are not content-derived
    (e.g. ShareGPT's own ids), so an edited row is never served a stale score."""
    present = [c for c in columns if c in frame.columns]
    if not present:
        raise CacheError(f"frame has none of the content columns {list(columns)}")
    out = []
    for row in frame.select(present).iter_rows():
        text = json.dumps(row, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
        out.append(hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest())
    return out


def data_fingerprint(frame: pl.DataFrame, columns: Sequence[str] | None = None) -> str:
    """A hash of a whole frame's content, in row order: the "data content hash" part of
    a key for things computed from a set as a whole (a warmup model, a trained scorer)."""
    cols = list(columns) if columns is not None else [c for c in ("id", *CONTENT_COLUMNS) if c in frame.columns]
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise CacheError(f"frame lacks columns {missing}")
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([_VERSION, cols]).encode("utf-8"))
    for row in frame.select(cols).iter_rows():
        digest.update(json.dumps(row, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _check_key(key: str) -> str:
    """Keys become directory names: keep them to a safe alphabet (fingerprints fit)."""
    if not isinstance(key, str) or not _KEY.match(key):
        raise CacheError(f"bad cache key {key!r}: use fingerprint(...) or [A-Za-z0-9._-], at most 128 chars")
    return key


# --------------------------------------------------------------------------- scores


def _check_shard(path: Path, frame: pl.DataFrame, schema: Mapping[str, pl.DataType]) -> None:
    """A shard that lacks a column, or holds it with another type, would silently turn scores
    into nulls (and change a selection): refuse it, naming the file."""
    missing = [c for c in schema if c not in frame.columns]
    wrong = [f"{c} is {frame.schema[c]}, expected {t}" for c, t in schema.items()
             if c in frame.columns and frame.schema[c] != t and frame.schema[c] != pl.Null]
    if missing or wrong:
        what = "; ".join(([f"missing column(s) {', '.join(missing)}"] if missing else []) + wrong)
        raise CacheError(f"corrupt cache entry {path}: {what}. Delete it (or its folder {path.parent}) "
                         "and run again to recompute those rows")


class ScoreCache:
    """Per-row results keyed by (cache key, row id), stored as Parquet shards.

    Layout: ``root/scores/<key>/shard-00000.parquet, shard-00001.parquet, ...``. A
    shard holds an ``id`` column plus whatever result columns the operator produces.
    Later shards win when an id appears twice. `disabled=True` (``--no-cache``) makes
    every `get` a miss and every `put` a no-op.
    """

    def __init__(self, root: str | Path | None = None, *, disabled: bool = False) -> None:
        self.disabled = disabled
        self.root = Path(root) if root is not None else default_cache_root()

    @property
    def enabled(self) -> bool:
        return not self.disabled

    def key_dir(self, key: str) -> Path:
        return self.root / "scores" / _check_key(key)

    def shards(self, key: str) -> list[Path]:
        """Completed shards in write order (temporary files are never listed)."""
        folder = self.key_dir(key)
        if self.disabled or not folder.is_dir():
            return []
        found = [(int(m.group(1)), p.name, p) for p in folder.iterdir() if (m := _SHARD.match(p.name))]
        return [p for _, _, p in sorted(found)]

    def get(self, key: str, ids: Iterable[str], schema: Mapping[str, pl.DataType] | None = None
            ) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """(found: id -> result columns, missing ids in the order asked). With `schema`, every
        shard must hold those columns with those types (else a CacheError naming the shard)."""
        frame, missing = self.get_frame(key, ids, schema)
        found = {row.pop("id"): row for row in frame.iter_rows(named=True)}
        return found, missing

    def get_frame(self, key: str, ids: Iterable[str], schema: Mapping[str, pl.DataType] | None = None
                  ) -> tuple[pl.DataFrame, list[str]]:
        """Like `get`, but the hits as a frame (id + result columns) ready to join."""
        wanted = list(ids)
        stored = self._read_all(key, schema)
        if stored is None:
            return pl.DataFrame({"id": []}, schema={"id": pl.String}), wanted
        hits = stored.filter(pl.col("id").is_in(wanted))
        have = set(hits["id"].to_list())
        return hits, [i for i in wanted if i not in have]

    def _read_all(self, key: str, schema: Mapping[str, pl.DataType] | None = None) -> pl.DataFrame | None:
        paths = self.shards(key)
        if not paths:
            return None
        frames = [self._read_shard(p) for p in paths]
        if schema is not None:
            for path, frame in zip(paths, frames):
                _check_shard(path, frame, {"id": pl.String, **schema})
        merged = pl.concat(frames, how="diagonal_relaxed")
        return merged.unique(subset="id", keep="last", maintain_order=True)

    @staticmethod
    def _read_shard(path: Path) -> pl.DataFrame:
        try:
            return pl.read_parquet(path)
        except Exception as e:  # polars raises several types for a damaged file
            raise CacheError(f"unreadable cache shard {path}: {e}; delete it to recompute those rows") from e

    def put(self, key: str, rows: pl.DataFrame) -> Path | None:
        """Persist one chunk of results as a new shard; returns its path (None if
        disabled or empty). Written to a temporary file, then linked into place under
        the next free shard number, so concurrent writers never clobber each other."""
        _check_key(key)
        if self.disabled or rows.height == 0:
            return None
        self._check_rows(rows)
        folder = self.key_dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".shard.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            rows.write_parquet(tmp)
            fsync_file(tmp)
            final = self._publish(folder, tmp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        fsync_dir(folder)
        return final

    @staticmethod
    def _check_rows(rows: pl.DataFrame) -> None:
        if "id" not in rows.columns:
            raise CacheError(f"score rows need an 'id' column; got {rows.columns}")
        if rows.schema["id"] != pl.String:
            raise CacheError(f"score rows' 'id' must be strings, got {rows.schema['id']}")
        if rows["id"].null_count():
            raise CacheError("score rows have null ids")
        if rows["id"].n_unique() != rows.height:
            raise CacheError("score rows repeat an id within one chunk")

    def _publish(self, folder: Path, tmp: Path) -> Path:
        """Hard-link `tmp` to the first free shard name (link fails if the name exists)."""
        existing = self.shards_in(folder)
        n = existing[-1] + 1 if existing else 0
        while True:
            final = folder / f"shard-{n:05d}.parquet"
            try:
                os.link(tmp, final)
                return final
            except FileExistsError:
                n += 1
            except OSError:
                # No hard links on this filesystem: a unique name keeps it clobber-free.
                final = folder / f"shard-{n:05d}-{secrets.token_hex(4)}.parquet"
                os.replace(tmp, final)
                return final

    @staticmethod
    def shards_in(folder: Path) -> list[int]:
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _SHARD.match(p.name)))

    def describe(self, key: str, what: dict[str, Any]) -> None:
        """Record, once, the structure a key was fingerprinted from (for humans
        inspecting the cache; never read back to decide anything)."""
        if self.disabled:
            return
        from tamis.runtime.outputs import write_json

        meta = self.key_dir(key) / "key.json"
        if not meta.exists():
            write_json(what, meta)

    def clear(self, key: str) -> None:
        """Forget every shard of `key` (e.g. after a scorer bug fix that kept its key)."""
        folder = self.key_dir(key)
        if folder.is_dir():
            shutil.rmtree(folder)


# --------------------------------------------------------------------------- artifacts


class ArtifactCache:
    """Directories (trained models, scorers) keyed by content: ``root/artifacts/<key>/``.

    With `disabled=True` the cache lives in a private temporary directory that is
    removed when this object is garbage-collected: artifacts still exist for the
    run that built them, but nothing is reused across runs. Keep the object alive
    while their paths are in use.
    """

    def __init__(self, root: str | Path | None = None, *, disabled: bool = False) -> None:
        self.disabled = disabled
        if disabled:
            self.root = Path(tempfile.mkdtemp(prefix="tamis-nocache-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.root, True)
        else:
            self.root = Path(root) if root is not None else default_cache_root()

    def path_for(self, key: str) -> Path:
        return self.root / "artifacts" / _check_key(key)

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_dir()

    def building(self, key: str) -> contextlib.AbstractContextManager[Path]:
        """A context yielding an empty temporary directory to build into; on success it
        becomes `path_for(key)`. On any exception it is deleted and nothing appears. If
        another process finished the same key first, its (equivalent) artifact is kept."""
        return atomic_dir(self.path_for(key), keep_existing=True)

    def remove(self, key: str) -> None:
        path = self.path_for(key)
        if path.is_dir():
            shutil.rmtree(path)


# --------------------------------------------------------------------------- bundle


@dataclasses.dataclass
class Cache:
    """Both caches over one root, as the executor wants them."""

    scores: ScoreCache
    artifacts: ArtifactCache

    @property
    def disabled(self) -> bool:
        return self.scores.disabled


def open_cache(root: str | Path | None = None, *, disabled: bool = False) -> Cache:
    """The cache for a run: `root` or the default root; `disabled` for --no-cache."""
    base = Path(root) if root is not None else default_cache_root()
    return Cache(ScoreCache(base, disabled=disabled), ArtifactCache(base, disabled=disabled))
