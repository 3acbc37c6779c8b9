"""A content-addressed cache for per-row scores and trained artifacts.

Scoring a pool with a model is the expensive part of a recipe, so results are
cached under a key that says *what* was computed — operator, its semantic
parameters, model fingerprint, prompt template, truncation, data content — and
never *when* (no run ids, no timestamps). Two runs that ask for the same thing
share the result; changing anything that affects a score changes the key.

Scores are persisted **chunk by chunk**: the executor scores the missing ids in
chunks and hands each chunk to a `ScoreWriter` as soon as it is done, which appends
it to its own journal (one write, no fsync, no directory listing) and turns the
journal into one Parquet shard every so many rows and at the end. A killed run loses
at most the chunk in flight; the next run `lookup`s what is there (one vectorised
Polars read) and scores only the rest.

Trained artifacts (a warmed-up model, a trained scorer) are built in a temporary
directory and renamed into place only on success, so a killed training never
leaves a half artifact that a later run would trust.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import struct
import tempfile
import time
import weakref
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePath
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import polars as pl

from tamis.runtime.outputs import atomic_dir, fsync_dir, fsync_file

from tamis.errors import TamisError

__all__ = [
    "CACHE_FORMAT",
    "ArtifactCache",
    "Cache",
    "CacheError",
    "ScoreCache",
    "ScoreWriter",
    "data_fingerprint",
    "default_cache_root",
    "fingerprint",
    "open_cache",
    "row_content_hashes",
    "row_content_keys",
]

_VERSION = "tamis-cache-v2"  # bump when the meaning of cached bytes or of a row key changes (v2: XXH3 row keys)
CACHE_FORMAT = _VERSION
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHARD = re.compile(r"^shard-(\d+)(?:-[0-9a-f]+)?\.parquet$")
_JOURNAL = re.compile(r"^shard-(\d+)\.journal$")
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
    return row_content_keys(frame, columns).to_list()


def row_content_keys(frame: pl.DataFrame, columns: Sequence[str] = CONTENT_COLUMNS) -> pl.Series:
    """`row_content_hashes` as a String series named ``id`` (the executor's resume path): each row's
    XXH3-128 row hash over the content columns present (`tamis.runtime.rowhash`), column-wise."""
    from tamis.runtime.rowhash import row_hashes

    present = [c for c in columns if c in frame.columns]
    if not present:
        raise CacheError(f"frame has none of the content columns {list(columns)}")
    return row_hashes(frame, present, "id")


def data_fingerprint(frame: pl.DataFrame, columns: Sequence[str] | None = None) -> str:
    """A hash of a whole frame's content, in row order: the "data content hash" part of
    a key for things computed from a set as a whole (a warmup model, a trained scorer)."""
    cols = list(columns) if columns is not None else fingerprint_columns(frame.columns)
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise CacheError(f"frame lacks columns {missing}")
    from tamis.runtime.rowhash import CHUNK, row_hashes

    # each row's hash, in order (column-wise, no row objects)
    return hashes_fingerprint(cols, (row_hashes(frame.slice(s, CHUNK), cols) for s in range(0, frame.height, CHUNK)))


def fingerprint_columns(names: Sequence[str]) -> list[str]:
    """The columns `data_fingerprint` hashes by default: the id and the content columns a frame has."""
    return [c for c in ("id", *CONTENT_COLUMNS) if c in names]


def hashes_fingerprint(cols: Sequence[str], parts: Iterable[pl.Series]) -> str:
    """`data_fingerprint` from the rows' hashes over `cols` (`rowhash.row_hashes`), given in row order as
    consecutive parts: an engine that hashes its rows elsewhere gets the same key as the whole frame."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([_VERSION, list(cols)]).encode("utf-8"))
    for part in parts:
        digest.update("".join(part.to_list()).encode("ascii"))
    return digest.hexdigest()


def _check_key(key: str) -> str:
    """Keys become directory names: keep them to a safe alphabet (fingerprints fit)."""
    if not isinstance(key, str) or not _KEY.match(key):
        raise CacheError(f"bad cache key {key!r}: use fingerprint(...) or [A-Za-z0-9._-], at most 128 chars")
    return key


# --------------------------------------------------------------------------- scores


def _check_shard(path: Path, columns: Mapping[str, pl.DataType], schema: Mapping[str, pl.DataType]) -> None:
    """A shard (or journal frame) whose `columns` lack a column of `schema`, or hold it with
    another type, would silently turn scores into nulls (and change a selection): refuse it,
    naming the file."""
    missing = [c for c in schema if c not in columns]
    wrong = [f"{c} is {columns[c]}, expected {t}" for c, t in schema.items()
             if c in columns and columns[c] != t and columns[c] != pl.Null]
    if missing or wrong:
        what = "; ".join(([f"missing column(s) {', '.join(missing)}"] if missing else []) + wrong)
        raise CacheError(f"corrupt cache entry {path}: {what}. Delete it (or its folder {path.parent}) "
                         "and run again to recompute those rows")


_FRAME = struct.Struct("<4sQI")  # a journal frame's header: magic, payload bytes, CRC-32 of the payload
_FRAME_MAGIC = b"TSJ1"  # read only (tamis before journals counted their rows)
_FRAME2 = struct.Struct("<4sQII")  # the same, then the chunk's rows: a cut-off chunk still says its size
_FRAME2_MAGIC = b"TSJ2"
_COMPACT_ROWS = 1 << 16  # a writer turns its journal into one Parquet shard every this many rows (and at close)
_RELIST_AFTER = 64  # shard numbers found taken in a row before a writer lists the folder again


class _Entry(NamedTuple):
    number: int
    journal: bool  # a writer's append-only journal (else a Parquet shard); at equal numbers shards come first
    name: str
    path: Path


class ScoreCache:
    """Per-row results keyed by (cache key, row id), stored as Parquet shards.

    Layout: ``root/scores/<key>/shard-00000.parquet, shard-00001.parquet, ...`` plus, while a
    writer streams chunks (or after it was killed), its journal ``shard-NNNNN.journal``. A shard
    holds an ``id`` column plus whatever result columns the operator produces. Entries are read
    in number order and later ones win when an id appears twice (within a journal, later
    chunks win). A journal takes its number with its first chunk and its Parquet shard keeps
    it, so a run always wins over the runs before it (a resumed run, a `put` after a writer
    closed); two writers racing on one id (the same key computes the same value) are ordered
    by those numbers. `disabled=True` (``--no-cache``) makes every `get` a miss and every
    `put` a no-op.

    Two ways to write:

    * `put(key, rows)`: one chunk, one Parquet shard, fsynced before and after it is linked
      into place — durable on return, about a millisecond or more per call.
    * `writer(key)`: the streaming path the executor uses. Each chunk is appended to the
      writer's own journal (one ``write`` of a CRC-framed Arrow IPC message: tens of
      microseconds, no listing, no fsync), so a killed process loses at most the chunk in flight;
      every `compact_rows` rows (in the background) and at close the journal's chunks become one
      Parquet shard (fsynced, linked, then the journal is removed). See `ScoreWriter` for the
      durability trade-off.

    Shard numbers are claimed without listing the folder: each `ScoreCache` keeps a counter per
    folder (seeded by one listing, or by the last read) and claims a number with an exclusive
    ``link``/``O_EXCL`` create, moving on when another writer holds it. Reads list the folder
    once, scan the Parquet shards with Polars, and keep the last row per id, vectorised.
    """

    def __init__(self, root: str | Path | None = None, *, disabled: bool = False) -> None:
        self.disabled = disabled
        self.root = Path(root) if root is not None else default_cache_root()
        self._next: dict[Path, int] = {}  # folder -> the shard number this process tries next
        # key -> rows of chunks cut off at the end of a journal (a killed writer's chunk in flight), as the
        # last read of that key found them; -1: a cut-off chunk whose size is unknown (its header is cut too)
        self.torn_rows: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return not self.disabled

    def key_dir(self, key: str) -> Path:
        return self.root / "scores" / _check_key(key)

    def shards(self, key: str) -> list[Path]:
        """Completed Parquet shards in write order (temporary files and journals are never listed)."""
        if self.disabled:
            return []
        return [e.path for e in self._entries(self.key_dir(key)) if not e.journal]

    # ---- reading -------------------------------------------------------------------

    def get(self, key: str, ids: Iterable[str], schema: Mapping[str, pl.DataType] | None = None
            ) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """(found: id -> result columns, missing ids in the order asked). With `schema`, every
        shard must hold those columns with those types (else a CacheError naming the shard).
        Kept for compatibility: it builds a dict per row; `lookup` is the vectorised path."""
        frame, missing = self.get_frame(key, ids, schema)
        found = {row.pop("id"): row for row in frame.iter_rows(named=True)}
        return found, missing

    def get_frame(self, key: str, ids: Iterable[str] | pl.Series, schema: Mapping[str, pl.DataType] | None = None
                  ) -> tuple[pl.DataFrame, list[str]]:
        """Like `get`, but the hits as a frame (id + result columns) ready to join."""
        wanted = _id_series(ids)
        hits = self.lookup(key, wanted, schema)
        missing = (pl.DataFrame([wanted]).join(hits.select("id"), on="id", how="anti", maintain_order="left")
                   ["id"].to_list())
        return hits, missing

    def lookup(self, key: str, ids: Iterable[str] | pl.Series, schema: Mapping[str, pl.DataType] | None = None
               ) -> pl.DataFrame:
        """The stored results for `ids`: a frame of ``id`` plus the result columns (those of
        `schema`, in its order and with its types, when given), one row per stored id, in no
        particular order. Every shard and journal frame is checked against `schema` first."""
        wanted = _id_series(ids)
        stored = self._read_all(key, schema, last_only=False)
        if stored is None:
            return pl.DataFrame(schema={"id": pl.String, **(schema or {})})
        wanted_frame = pl.DataFrame([wanted])
        hits = stored.join(wanted_frame, on="id", how="semi")
        if hits["id"].n_unique() != hits.height:  # some id was stored twice: later rows win
            stored = stored.unique(subset="id", keep="last", maintain_order=False)
            hits = stored.join(wanted_frame, on="id", how="semi")
        return hits

    def stored(self, key: str, schema: Mapping[str, pl.DataType] | None = None) -> pl.DataFrame:
        """Every stored result of `key` (``id`` plus the result columns, checked as in `lookup`), each id
        once (later rows win), in no particular order: what a distributed lookup joins against."""
        stored = self._read_all(key, schema, last_only=False)
        if stored is None:
            return pl.DataFrame(schema={"id": pl.String, **(schema or {})})
        if stored["id"].n_unique() != stored.height:
            stored = stored.unique(subset="id", keep="last", maintain_order=False)
        return stored

    def align(self, key: str, ids: Iterable[str] | pl.Series, schema: Mapping[str, pl.DataType], *,
              distinct: bool = False) -> tuple[pl.DataFrame, pl.Series]:
        """The stored results lined up with `ids` (which may repeat): a frame with one row per
        entry of `ids`, in that order — ``id`` and the columns of `schema`, null where nothing is
        stored — and a Boolean series saying which entries were found. One left join; the
        last-row-per-id pass runs only when an id asked for is stored more than once. This is
        the executor's resume path: no Python object per row.

        `distinct`: the caller knows `ids` has no repeats. Then, when what is stored is exactly the
        first rows asked for, in order (a run resumed over the same rows: its chunks were written in
        row order), the stored rows are the answer as they are, without a join."""
        wanted = pl.DataFrame([_id_series(ids)])
        columns = {"id": pl.String, **schema}
        stored = self._read_all(key, schema, last_only=False)
        if stored is None:
            empty = wanted.with_columns([pl.lit(None, dtype=t).alias(c) for c, t in schema.items()])
            return empty.select(list(columns)), pl.Series("found", [False] * wanted.height, dtype=pl.Boolean)
        if distinct and stored.height <= wanted.height and stored["id"].equals(wanted["id"].head(stored.height)):
            found = pl.select((pl.int_range(wanted.height) < stored.height).alias("found")).to_series()
            rest = wanted.slice(stored.height).with_columns([pl.lit(None, dtype=t).alias(c) for c, t in schema.items()])
            return pl.concat([stored.select(list(columns)), rest.select(list(columns))], how="vertical"), found
        hit = "⟨found⟩"  # not a name a result column can have
        marked = stored.with_columns(pl.lit(True).alias(hit))
        joined = wanted.join(marked, on="id", how="left", maintain_order="left")
        if joined.height != wanted.height:  # some id was stored twice: later rows win
            marked = marked.unique(subset="id", keep="last", maintain_order=False)
            joined = wanted.join(marked, on="id", how="left", maintain_order="left")
        return joined.select(list(columns)), joined[hit].is_not_null().alias("found")

    def _read_all(self, key: str, schema: Mapping[str, pl.DataType] | None = None, *,
                  last_only: bool = True) -> pl.DataFrame | None:
        """Every stored row of `key` — only the last one per id, unless `last_only` is False (then
        in entry order, a repeated id's rows in the order written) — or None when nothing is stored."""
        if self.disabled:
            return None
        folder = self.key_dir(key)
        mark_used(folder)
        for _ in range(8):
            entries = self._entries(folder)
            torn: list[int] = []
            self.torn_rows.pop(key, None)
            if not entries:
                return None
            try:
                parts = self._read_entries(entries, None if schema is None else {"id": pl.String, **schema}, torn)
            except FileNotFoundError:
                continue  # a writer turned a journal into a shard (or the key was cleared) meanwhile: list again
            if torn:
                self.torn_rows[key] = -1 if -1 in torn else sum(torn)
            if not parts:
                return None
            merged = pl.concat(parts, how="vertical" if schema is not None else "diagonal_relaxed")
            return merged.unique(subset="id", keep="last", maintain_order=False) if last_only else merged
        raise CacheError(f"cache folder {folder} kept changing while it was read; run again")

    def _read_entries(self, entries: list[_Entry], want: dict[str, pl.DataType] | None,
                      torn: list[int] | None = None) -> list[pl.DataFrame]:
        """The entries' rows in entry order: runs of Parquet shards with one schema are scanned
        together (one Polars scan), journals are decoded frame by frame."""
        parts: list[pl.DataFrame] = []
        run: list[Path] = []
        run_schema: dict[str, pl.DataType] | None = None
        for entry in entries:
            if entry.journal:
                if run:
                    parts.append(self._scan(run, want))
                    run = []
                parts.extend(self._read_journal(entry.path, want, torn))
                continue
            columns = self._parquet_schema(entry.path)
            if want is not None:
                _check_shard(entry.path, columns, want)
            if run and columns != run_schema:
                parts.append(self._scan(run, want))
                run = []
            run.append(entry.path)
            run_schema = columns
        if run:
            parts.append(self._scan(run, want))
        return parts

    @staticmethod
    def _parquet_schema(path: Path) -> dict[str, pl.DataType]:
        try:
            return dict(pl.read_parquet_schema(path))
        except Exception as e:  # polars raises several types for a damaged file
            if not path.exists():
                raise FileNotFoundError(path) from e
            raise CacheError(f"unreadable cache shard {path}: {e}; delete it to recompute those rows") from e

    @classmethod
    def _scan(cls, paths: list[Path], want: dict[str, pl.DataType] | None) -> pl.DataFrame:
        """Shards with one schema, read in one scan, in order (their columns cast to `want`,
        which only changes all-null columns: anything else was refused by `_check_shard`)."""
        scan = pl.scan_parquet(paths, glob=False, hive_partitioning=False)
        if want is not None:
            scan = scan.select([pl.col(c).cast(t) for c, t in want.items()])
        try:
            return scan.collect()
        except Exception:
            for path in paths:  # name the damaged shard
                cls._read_shard(path)
            raise

    @staticmethod
    def _read_shard(path: Path) -> pl.DataFrame:
        try:
            return pl.read_parquet(path, glob=False, hive_partitioning=False)
        except Exception as e:  # polars raises several types for a damaged file
            if not path.exists():
                raise FileNotFoundError(path) from e
            raise CacheError(f"unreadable cache shard {path}: {e}; delete it to recompute those rows") from e

    @staticmethod
    def _read_journal(path: Path, want: dict[str, pl.DataType] | None,
                      torn: list[int] | None = None) -> list[pl.DataFrame]:
        """A journal's complete chunks. Reading stops at the first frame that is cut short or
        fails its CRC: that is the chunk a killed writer had in flight (or, after a power loss,
        data that never reached the disk), so its rows are simply computed again. Their number
        (from the frame's header; -1 where the header itself is cut) is appended to `torn`."""
        with open(path, "rb") as f:  # FileNotFoundError: compacted meanwhile; the caller lists again
            data = f.read()
        frames: list[pl.DataFrame] = []
        pos, end = 0, len(data)
        view = memoryview(data)
        while pos < end:
            rows = -1
            if data[pos:pos + 4] == _FRAME2_MAGIC and pos + _FRAME2.size <= end:
                _, size, crc, rows = _FRAME2.unpack_from(data, pos)
                head = _FRAME2.size
            elif data[pos:pos + 4] == _FRAME_MAGIC and pos + _FRAME.size <= end:
                _, size, crc = _FRAME.unpack_from(data, pos)
                head = _FRAME.size
            else:
                head = None
            stop = pos + head + size if head is not None else end + 1
            if stop > end or zlib.crc32(view[pos + head:stop]) != crc:
                if torn is not None:
                    torn.append(rows)
                break
            try:
                frames.append(pl.read_ipc_stream(io.BytesIO(view[pos + head:stop])))
            except Exception:
                if torn is not None:
                    torn.append(rows)
                break
            pos = stop
        parts: list[pl.DataFrame] = []
        i = 0
        while i < len(frames):  # runs of one layout (a writer keeps one per journal) checked and cast at once
            j = i + 1
            while j < len(frames) and frames[j].columns == frames[i].columns and frames[j].dtypes == frames[i].dtypes:
                j += 1
            run = pl.concat(frames[i:j], how="vertical") if j - i > 1 else frames[i]
            if want is not None:
                _check_shard(path, run.schema, want)
                run = run.select([pl.col(c).cast(t) for c, t in want.items()])
            parts.append(run)
            i = j
        return parts

    def _entries(self, folder: Path) -> list[_Entry]:
        """Shards and journals in `folder`, in number order (one listing; it also moves this
        process's shard counter past every number seen)."""
        found: list[_Entry] = []
        try:
            with os.scandir(folder) as listing:
                for item in listing:
                    if m := _SHARD.match(item.name):
                        found.append(_Entry(int(m.group(1)), False, item.name, folder / item.name))
                    elif m := _JOURNAL.match(item.name):
                        found.append(_Entry(int(m.group(1)), True, item.name, folder / item.name))
        except (FileNotFoundError, NotADirectoryError):
            return []
        found.sort()
        if found:
            self._advance(folder, found[-1].number + 1)
        return found

    # ---- writing -------------------------------------------------------------------

    def put(self, key: str, rows: pl.DataFrame) -> Path | None:
        """Persist one chunk of results as a new shard; returns its path (None if
        disabled or empty). Written to a temporary file, fsynced, then linked into place under
        the next free shard number, so concurrent writers never clobber each other. For many
        chunks in a row use `writer`, which is far cheaper per chunk."""
        _check_key(key)
        if self.disabled or rows.height == 0:
            return None
        self._check_rows(rows)
        folder = self.key_dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        return self._write_shard(folder, rows)

    def writer(self, key: str, *, compact_rows: int = _COMPACT_ROWS, sync_seconds: float = 1.0,
               background: bool = True) -> "ScoreWriter":
        """A streaming writer for `key` (use it as a context manager): see `ScoreWriter`."""
        _check_key(key)
        return ScoreWriter(self, key, compact_rows=compact_rows, sync_seconds=sync_seconds, background=background)

    def _write_shard(self, folder: Path, rows: pl.DataFrame, number: int | None = None, **parquet: Any) -> Path:
        """Write `rows` as a shard: under `number` (a journal's own, when compacting it) or the next free one."""
        tmp = folder / f".shard.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            rows.write_parquet(tmp, **parquet)
            fsync_file(tmp)  # the data is on disk before any name points at it
            final = self._publish(folder, tmp) if number is None else self._publish_at(folder, tmp, number)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        fsync_dir(folder)  # and the name survives a power loss
        return final

    @staticmethod
    def _check_rows(rows: pl.DataFrame) -> None:
        if "id" not in rows.columns:
            raise CacheError(f"score rows need an 'id' column; got {rows.columns}")
        ids = rows.get_column("id")
        if ids.dtype != pl.String:
            raise CacheError(f"score rows' 'id' must be strings, got {ids.dtype}")
        if ids.null_count():
            raise CacheError("score rows have null ids")
        if ids.n_unique() != rows.height:
            raise CacheError("score rows repeat an id within one chunk")

    def _publish(self, folder: Path, tmp: Path) -> Path:
        """Hard-link `tmp` to the next free shard number (a link fails if the name exists, so
        nothing is ever replaced). The number comes from this process's counter, not a listing."""
        n, taken = self._start(folder), 0
        while True:
            final = folder / f"shard-{n:05d}.parquet"
            try:
                os.link(tmp, final)
            except FileExistsError:
                n, taken = self._taken(folder, n, taken)
                continue
            except OSError:
                # No hard links on this filesystem: a unique name keeps it clobber-free.
                final = folder / f"shard-{n:05d}-{secrets.token_hex(4)}.parquet"
                os.replace(tmp, final)
                self._advance(folder, n + 1)
                return final
            if os.path.lexists(folder / f"shard-{n:05d}.journal"):  # a writer's journal holds this number
                final.unlink()
                n, taken = self._taken(folder, n, taken)
                continue
            self._advance(folder, n + 1)
            return final

    def _publish_at(self, folder: Path, tmp: Path, n: int) -> Path:
        """Link `tmp` as ``shard-n.parquet``, the number of the journal it compacts (so its rows keep
        their rank). Another writer may hold that name for an instant (it drops it on seeing the
        journal); if it stays taken (a tamis that knows no journals), take a fresh number."""
        final = folder / f"shard-{n:05d}.parquet"
        for _ in range(20):
            try:
                os.link(tmp, final)
                return final
            except FileExistsError:
                time.sleep(0.0005)
            except OSError:  # no hard links on this filesystem: a unique name keeps it clobber-free
                final = folder / f"shard-{n:05d}-{secrets.token_hex(4)}.parquet"
                os.replace(tmp, final)
                return final
        return self._publish(folder, tmp)

    def _open_journal(self, folder: Path) -> tuple[int, Path, int]:
        """Create this writer's journal under the next free shard number (exclusively)."""
        folder.mkdir(parents=True, exist_ok=True)
        n, taken = self._start(folder), 0
        flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                 | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0))
        while True:
            path = folder / f"shard-{n:05d}.journal"
            try:
                fd = os.open(path, flags, 0o666)
            except FileExistsError:
                n, taken = self._taken(folder, n, taken)
                continue
            if os.path.lexists(folder / f"shard-{n:05d}.parquet"):  # a shard holds this number
                os.close(fd)
                path.unlink()
                n, taken = self._taken(folder, n, taken)
                continue
            self._advance(folder, n + 1)
            return fd, path, n  # its name is fsynced with its first synced chunk (ScoreWriter.put)

    def _start(self, folder: Path) -> int:
        if folder not in self._next:
            self._entries(folder)  # the one listing: start past every number there
            self._next.setdefault(folder, 0)
        return self._next[folder]

    def _taken(self, folder: Path, n: int, taken: int) -> tuple[int, int]:
        """The next number to try after `n` was taken by another writer; after many in a row the
        counter is stale (another process wrote a lot), so list once and jump past them all."""
        taken += 1
        if taken % _RELIST_AFTER == 0:
            self._entries(folder)
            return max(n + 1, self._next.get(folder, 0)), taken
        return n + 1, taken

    def _advance(self, folder: Path, n: int) -> None:
        if n > self._next.get(folder, -1):
            self._next[folder] = n

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
            write_json({**what, "cache_format": _VERSION}, meta)  # `tamis cache list` flags other formats

    def clear(self, key: str) -> None:
        """Forget every shard and journal of `key` (e.g. after a scorer bug fix that kept its key)."""
        folder = self.key_dir(key)
        if folder.is_dir():
            shutil.rmtree(folder)
        self._next.pop(folder, None)


def mark_used(folder: Path) -> None:
    """Record that an entry is being used, for `tamis cache`'s "last use" (and `clean --older-than`):
    its folder's mtime becomes now. One system call that creates nothing, so no reader can ever see
    a half-written marker; a missing folder or a read-only cache is simply not marked."""
    with contextlib.suppress(OSError):
        os.utime(folder)


def _id_series(ids: Iterable[str] | pl.Series) -> pl.Series:
    if isinstance(ids, pl.Series):
        return ids.rename("id") if ids.dtype == pl.String else ids.cast(pl.String).rename("id")
    return pl.Series("id", list(ids), dtype=pl.String)


def _ipc_frame(rows: pl.DataFrame) -> tuple[bytes, memoryview]:
    """One journal frame for `rows`: (header, payload) with the payload an Arrow IPC stream."""
    buffer = io.BytesIO()
    rows.write_ipc_stream(buffer, compression="uncompressed")
    payload = buffer.getbuffer()
    return _FRAME2.pack(_FRAME2_MAGIC, len(payload), zlib.crc32(payload), rows.height), payload


def _layout_of(rows: pl.DataFrame, payload: memoryview) -> bytes:
    """Bytes that are equal for two chunks exactly when their columns and types are: the schema
    message that opens an Arrow IPC stream (continuation marker, length, metadata)."""
    if payload[:4] == b"\xff\xff\xff\xff" and len(payload) >= 8:
        return bytes(payload[:8 + int.from_bytes(payload[4:8], "little")])
    return repr([(c, str(t)) for c, t in zip(rows.columns, rows.dtypes)]).encode()  # another framing


def _write_all(fd: int, header: bytes, payload: memoryview) -> None:
    """Append one frame with as few system calls as possible (one `writev` in practice)."""
    total = len(header) + len(payload)
    written = os.writev(fd, [header, payload]) if hasattr(os, "writev") else os.write(fd, header + bytes(payload))
    if written < total:  # a short write (a signal, a full disk): finish it or fail
        rest = memoryview(header + bytes(payload))[written:]
        while rest:
            n = os.write(fd, rest)
            rest = rest[n:]


class ScoreWriter:
    """Streams one key's results into the cache, chunk by chunk (`ScoreCache.writer`).

    ``put(rows)`` appends the chunk to this writer's journal ``shard-NNNNN.journal`` (its own
    file, created exclusively, so concurrent writers never touch each other's data) as one
    CRC-framed Arrow IPC message, with a single ``write``: once `put` returns the chunk is in
    the operating system's hands, so killing the process loses at most the chunk in flight, and
    a reader stops at a cut-short frame. Every `compact_rows` rows the journal's chunks become
    one Parquet shard of the journal's number — written, fsynced, linked, the folder fsynced,
    then the journal removed — on a background thread (`background`), while later chunks go to
    a new journal; at `close` (the end of a ``with`` block, also on an exception) the rest is
    compacted the same way, and any failure of a background compaction is raised.

    fsync, and why fewer: `put` used to fsync every chunk twice (file, folder), which guards
    only against a power loss or kernel crash, not against a killed process (whose writes the
    kernel keeps). The journal is fsynced at most once per `sync_seconds` (at the first chunk
    after that much time has passed; the executor passes ``--checkpoint-seconds``, so a slow
    scorer's chunks are each synced as before), its folder entry with its first sync, and each
    compacted shard, then the folder, before the journal is removed. A power loss can therefore
    lose at most the last `sync_seconds` of chunks (recomputed on the next run: a damaged tail
    fails its CRC), and never leaves a published shard pointing at unwritten data.
    """

    def __init__(self, cache: ScoreCache, key: str, *, compact_rows: int = _COMPACT_ROWS,
                 sync_seconds: float = 1.0, background: bool = True) -> None:
        self.cache = cache
        self.key = key
        self.folder = cache.key_dir(key)
        self.compact_rows = max(1, int(compact_rows))
        self.sync_seconds = sync_seconds
        self.background = background
        self.shards: list[Path] = []  # the Parquet shards this writer published
        self._fd: int | None = None
        self._journal: Path | None = None
        self._number: int | None = None  # the journal's shard number, which its compacted shard keeps
        self._retired: list[Path] = []  # journals closed after a failed write; removed at the next compaction
        self._frames: list[pl.DataFrame] = []
        self._rows = 0
        self._layout: bytes | None = None
        self._synced = 0.0
        self._named = False  # the journal's folder entry fsynced
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[Path] | None = None  # the compaction in flight (at most one)

    @property
    def journal(self) -> Path | None:
        """The journal being appended to (None before the first chunk and after each compaction)."""
        return self._journal

    def put(self, rows: pl.DataFrame, *, check: bool = True) -> None:
        """Append one chunk (an ``id`` column plus result columns); see the class docstring. The
        columns and types are checked whenever they change; `check=False` skips the per-chunk
        check that ids are non-null and distinct (for callers that build them so)."""
        if self.cache.disabled or rows.height == 0:
            return
        self._collect(wait=False)  # a failed background compaction fails the next chunk
        header, payload = _ipc_frame(rows)
        layout = _layout_of(rows, payload)  # the IPC schema message: equal bytes, equal columns and types
        if layout != self._layout:
            ScoreCache._check_rows(rows)
            if self._layout is not None:
                self._rotate()  # one layout per journal and per shard
        elif check:  # same columns and types as the last chunk: only the ids' values need checking
            ids = rows.get_column("id")
            if ids.null_count() or ids.n_unique() != rows.height:
                ScoreCache._check_rows(rows)
        if self._fd is None:
            self._fd, self._journal, self._number = self.cache._open_journal(self.folder)
            self._synced, self._named = time.monotonic(), False
        try:
            _write_all(self._fd, header, payload)
        except BaseException:
            self._retire()  # this journal may end in a torn frame: later chunks go to a new one
            raise
        self._frames.append(rows)
        self._rows += rows.height
        self._layout = layout
        now = time.monotonic()
        if now - self._synced >= self.sync_seconds:
            os.fsync(self._fd)
            if not self._named:
                fsync_dir(self.folder)  # the journal's name too, once
                self._named = True
            self._synced = now
        if self._rows >= self.compact_rows:
            self._rotate()

    def flush(self) -> Path | None:
        """Compact everything appended so far into Parquet now (waiting for a background
        compaction too); the shard for the latest chunks, or None when there were none."""
        self._collect(wait=True)
        had = bool(self._frames)
        self._rotate(background=False)
        return self.shards[-1] if had else None

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __enter__(self) -> "ScoreWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # Leaving on an error (a failing scorer, Ctrl-C): keep what was computed. If compacting
        # fails too, the journal still holds every chunk; don't hide the original error.
        with contextlib.suppress(Exception):
            self.close()
        self._close_fd()

    def _rotate(self, background: bool | None = None) -> None:
        """Close the journal and compact its chunks (in the background unless told otherwise);
        the next chunk starts a new journal, under a higher number."""
        frames, number, journals = self._frames, self._number, [*self._retired, *filter(None, [self._journal])]
        self._frames, self._rows, self._layout = [], 0, None
        self._close_fd()
        self._journal, self._number, self._retired = None, None, []
        if not frames:
            _unlink_all(journals)
            return
        self._collect(wait=True)  # one compaction at a time: memory stays bounded
        if self.background if background is None else background:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tamis-cache-compact")
            self._pending = self._pool.submit(self._compact, frames, number, journals)
        else:
            self.shards.append(self._compact(frames, number, journals))

    def _compact(self, frames: list[pl.DataFrame], number: int | None, journals: list[Path]) -> Path:
        merged = pl.concat(frames, how="vertical", rechunk=True)
        # lz4 without statistics: about twice as fast to write as the default zstd, read as fast
        final = self.cache._write_shard(self.folder, merged, number=number, compression="lz4", statistics=False)
        _unlink_all(journals)  # after the shard's name is durable: a power loss keeps one of the two
        return final

    def _collect(self, wait: bool) -> None:
        """Record the background compaction's shard once it is done; raise its error if it failed."""
        if self._pending is not None and (wait or self._pending.done()):
            job, self._pending = self._pending, None
            self.shards.append(job.result())

    def _retire(self) -> None:
        if self._journal is not None:
            self._retired.append(self._journal)
        self._close_fd()
        self._journal = None

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)


def _unlink_all(paths: Iterable[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


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
        path = self.path_for(key)
        mark_used(path)
        return path.is_dir()

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
