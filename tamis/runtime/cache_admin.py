"""`tamis cache`: what the cache holds (`list_cache`) and removing it (`clean_cache`).

Everything tamis stores lives under one root (``--cache-dir``, else `default_cache_root`):

    scores/<key>/      ScoreCache: ``key.json`` (what the key was fingerprinted from), Parquet
                       shards and journals of per-row results
    artifacts/<key>/   ArtifactCache: trained models; a warmup holds ``summary.json`` and ``model/``
    models/<key>/      GGUF → safetensors conversions (``tamis-source.json`` names the GGUF file)
    file-hashes.json   content hashes of model files, the basis of model fingerprints

Only metadata is read (``key.json``, ``summary.json``, the ``id`` column of shards): no model is
ever loaded. Model names are recovered from ``file-hashes.json``: a fingerprint is a hash of the
weight files' content hashes and the dtype (`tamis.runtime.models`), so hashing the recorded
file hashes the same way names the folder or GGUF file a score was computed with.

"Last use" is the newest mtime inside an entry, including the entry's folder itself: the cache
sets the folder's mtime whenever it reads an entry (`tamis.runtime.cache.mark_used`), and every
shard it writes is new. GGUF conversions are loaded outside the cache, so for them it is the
later of the conversion and the last access of their ``config.json`` (which every load reads;
with the usual "relatime" mounts the access time is kept to within a day).

Removal renames each entry into a hidden trash folder beside it (same filesystem, one atomic
rename: a reader either finds the whole entry or nothing) and only then deletes it; a trash
folder left by an interrupted clean is removed by the next one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import itertools
import json
import os
import re
import secrets
import shutil
import stat
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import polars as pl

from tamis.errors import TamisError

__all__ = [
    "CacheAdminError",
    "CacheEntry",
    "CacheListing",
    "CleanResult",
    "NotACacheError",
    "clean_cache",
    "clean_json",
    "clean_text",
    "human_age",
    "human_size",
    "list_cache",
    "listing_json",
    "listing_text",
    "parse_duration",
]

Kind = Literal["score", "embeddings", "warmup", "model conversion", "index", "other"]
KIND_ORDER: tuple[Kind, ...] = ("score", "embeddings", "warmup", "model conversion", "other", "index")

AREAS = ("scores", "artifacts", "models")  # folders of entries, one entry per child
INDEX = "file-hashes.json"  # model-file hashes (tamis.runtime.models._HASH_INDEX)
KNOWN = frozenset([*AREAS, INDEX])
TRASH = ".tamis-trash"  # hidden: no cache reader looks at names starting with "."
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+$")  # atomic_dir / atomic_path staging
_DTYPES = ("fp32", "bf16", "fp16")  # models.dtype_name values: a fingerprint hashes one of them
_MAX_COMBOS = 64  # per folder: stale index lines (an edited file) multiply the candidate identities


class CacheAdminError(TamisError):
    """`tamis cache` was asked something it cannot do (a bad duration, a refusal)."""


class NotACacheError(CacheAdminError):
    """The directory does not look like a tamis cache: nothing is removed from it."""


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class CacheEntry:
    """One removable thing in the cache."""

    kind: Kind
    name: str  # path relative to the cache root, e.g. "scores/021e87…"
    path: Path
    what: str  # what it holds, as readable as its metadata allows
    rows: int | None  # distinct rows stored (score entries), else None
    size: int  # bytes: the apparent size of every file inside (symbolic links not followed)
    last_used: float  # POSIX seconds
    note: str = ""  # e.g. "unfinished journal", "being built by process 123"
    busy: bool = False  # a build in progress: never removed


@dataclass(frozen=True)
class CacheListing:
    root: Path
    exists: bool
    entries: tuple[CacheEntry, ...]
    unexpected: tuple[str, ...]  # top-level names tamis never writes (clean refuses such a root)

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)

    def by_kind(self) -> dict[str, tuple[int, int]]:
        """kind -> (entries, bytes), in `KIND_ORDER`."""
        out: dict[str, tuple[int, int]] = {}
        for kind in KIND_ORDER:
            sizes = [e.size for e in self.entries if e.kind == kind]
            if sizes:
                out[kind] = (len(sizes), sum(sizes))
        return out


@dataclass(frozen=True)
class CleanResult:
    root: Path
    dry_run: bool
    older_than: float | None  # seconds; None with --all
    removed: tuple[CacheEntry, ...]  # (would be, with dry_run) removed
    kept: tuple[CacheEntry, ...]
    failed: tuple[tuple[CacheEntry, str], ...]  # could not be removed, and why

    @property
    def freed(self) -> int:
        return sum(e.size for e in self.removed)


# --------------------------------------------------------------------------- durations and sizes

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
DURATION_FORMS = "a number and a unit: 90m, 12h, 30d, 2w (units s, m, h, d, w; combined like 1d12h)"


def parse_duration(text: str, flag: str = "--older-than") -> float:
    """Seconds in `text` ("30d", "12h", "90m", "2w", "1d12h"); an error naming `flag` otherwise."""
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise CacheAdminError(f"{flag}: cannot read {text!r} as a duration; use {DURATION_FORMS}")
    return float(sum(float(n) * _UNITS[u] for n, u in parts))


def human_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    s = max(0.0, seconds)
    for limit, unit, per in ((60, "s", 1), (3600, "min", 60), (86400, "h", 3600), (14 * 86400, "d", 86400)):
        if s < limit:
            return f"{int(s // per)} {unit} ago"
    return f"{int(s // (7 * 86400))} w ago"


def _stamp(t: float) -> str:
    return _dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


# --------------------------------------------------------------------------- the root


def _root(root: str | os.PathLike[str] | None) -> Path:
    if root is None:
        from tamis.runtime.cache import default_cache_root

        return default_cache_root()
    return Path(root).expanduser()


def _unexpected(root: Path) -> tuple[str, ...]:
    """Top-level names tamis never writes there (its own temporary files and trash are fine)."""
    out = []
    for name in sorted(os.listdir(root)):
        if name in KNOWN or name == TRASH:
            continue
        m = _TEMP.match(name)
        if m and m.group("name") == INDEX:  # a file-hashes.json being replaced
            continue
        out.append(name)
    return tuple(out)


def check_cache_root(root: Path) -> None:
    """Refuse to remove anything from a directory that is not (only) a tamis cache: one given by
    mistake (``--cache-dir ~``) holds names tamis never writes, or none of the names it does."""
    if root.exists() and not root.is_dir():
        raise NotACacheError(f"--cache-dir {root}: not a directory")
    if not root.exists():
        return
    where = root.resolve()
    if where == Path.home().resolve() or where == Path(where.anchor):
        raise NotACacheError(f"--cache-dir {root} is {'your home' if where.parts[1:] else 'the root'} directory, "
                             "not a tamis cache; nothing was removed")
    names = os.listdir(root)
    unexpected = _unexpected(root)
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
        raise NotACacheError(
            f"--cache-dir {root} does not look like a tamis cache: it holds {shown}, which tamis never "
            f"writes (a tamis cache holds only {', '.join(sorted(KNOWN))}); nothing was removed. Point "
            "--cache-dir at the folder `tamis run --cache-dir` used, or remove the other files first")
    if names and not (KNOWN & set(names)):
        raise NotACacheError(f"--cache-dir {root} does not look like a tamis cache (none of "
                             f"{', '.join(sorted(KNOWN))}); nothing was removed")


# --------------------------------------------------------------------------- walking entries


def _walk(path: Path) -> tuple[int, float]:
    """(bytes of every file under `path`, newest mtime of `path` and everything under it), without
    following symbolic links. Missing (removed meanwhile) counts as empty."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return 0, 0.0
    if not stat.S_ISDIR(st.st_mode):  # a file, or a link (its own size: never followed)
        return st.st_size, st.st_mtime
    size, newest = 0, st.st_mtime
    stack = [path]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as listing:
                for item in listing:
                    try:
                        s = item.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    newest = max(newest, s.st_mtime)
                    if item.is_dir(follow_symlinks=False):
                        stack.append(Path(item.path))
                    else:
                        size += s.st_size
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
    return size, newest


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _score_rows(folder: Path) -> tuple[int | None, str]:
    """Distinct row ids stored in a score entry (only the ``id`` column is read), and a note."""
    from tamis.runtime.cache import ScoreCache

    ids: list[pl.Series] = []
    journals = 0
    try:
        for entry in ScoreCache(folder.parent.parent)._entries(folder):  # the cache's own listing rules
            if entry.journal:
                journals += 1
                # whole frames only, as a resuming run reads them (a cut-short last frame is dropped)
                ids += [f.get_column("id") for f in ScoreCache._read_journal(entry.path, None) if "id" in f.columns]
            else:
                ids.append(pl.scan_parquet(entry.path, glob=False, hive_partitioning=False)
                           .select(pl.col("id").cast(pl.String)).collect().get_column("id"))
    except FileNotFoundError:  # a writer compacted a journal meanwhile: the count is a moment old
        pass
    except Exception as e:  # noqa: BLE001 - polars raises several types for a damaged shard
        return None, f"unreadable: {str(e).splitlines()[0][:80]}"
    note = f"{journals} unfinished journal(s): a run in progress, or one that was killed" if journals else ""
    if not ids:
        return 0, note
    return pl.concat(ids, how="vertical").n_unique(), note


# --------------------------------------------------------------------------- model names


def _hash_parts(*parts: str) -> str:
    """`tamis.runtime.models._hash_parts`, repeated so that listing never imports torch (a test
    checks that the two agree)."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def _identities(names: dict[str, set[str]], wanted: Iterable[str]) -> list[str]:
    """`models._files_identity` strings for the files `wanted` of one folder: every combination of
    the hashes recorded for each (an edited file leaves its old hash behind), at most a few."""
    files = sorted(wanted)
    if not files:
        return []
    combos = itertools.islice(itertools.product(*[sorted(names[f]) for f in files]), _MAX_COMBOS)
    return ["|".join(f"{f}:{h}" for f, h in zip(files, combo)) for combo in combos]


def _index(root: Path) -> dict[str, str]:
    """file-hashes.json: "<resolved path>:<size>:<mtime_ns>" -> content hash ({} when absent or damaged)."""
    index = _read_json(root / INDEX)
    return {str(k): str(v) for k, v in index.items()} if isinstance(index, dict) else {}


def model_names(root: Path, index: dict[str, str] | None = None) -> dict[str, str]:
    """Model fingerprint -> a readable name, from the file hashes the cache recorded."""
    index = _index(root) if index is None else index
    folders: dict[Path, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for stamp, digest in index.items():
        path, *_ = str(stamp).rsplit(":", 2)  # "<resolved path>:<size>:<mtime_ns>"
        p = Path(path)
        folders[p.parent][p.name].add(digest)
    bases: list[tuple[str, str]] = []  # (identity, label) of full weights: a folder or a GGUF file
    adapters: list[tuple[str, str]] = [("", "")]
    for folder, names in folders.items():
        label = _folder_label(root, folder)
        for gguf in (n for n in names if n.endswith(".gguf")):
            bases += [(i, _folder_label(root, folder / gguf)) for i in _identities(names, [gguf])]
        if "adapter_config.json" in names:  # peft: adapter weights + config (models._apply_adapter)
            adapter = [n for n in names if n.startswith("adapter_model")] + ["adapter_config.json"]
            adapters += [(i, label) for i in _identities(names, adapter)]
        weights = [n for n in names if n.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl"))
                   and not n.startswith("adapter_model")]
        if weights and "config.json" in names:  # models._load_folder: weights + config.json
            bases += [(i, label) for i in _identities(names, [*weights, "config.json"])]
    found: dict[str, list[str]] = defaultdict(list)
    for (base, base_label), (adapter, adapter_label), dtype in itertools.product(bases, adapters, _DTYPES):
        # a warmup's name already says which base it was trained from
        name = adapter_label if adapter_label.startswith("warmup") else (
            f"{base_label} + adapter {adapter_label}" if adapter else base_label)
        found[_hash_parts(base, adapter, dtype)].append(f"{name}, {dtype}")
    out = {}
    for fp, labels in found.items():
        # equal weights share a fingerprint (a warmup that changed nothing): name the warmup first
        labels = sorted(dict.fromkeys(labels), key=lambda label: not label.startswith("warmup"))
        out[fp] = labels[0] + (f" (same weights as {labels[1].rsplit(', ', 1)[0]})" if len(labels) > 1 else "")
    return out


def _folder_label(root: Path, path: Path) -> str:
    """A short name for a model folder or file: a cache entry by what it is, else the path."""
    try:
        rel = path.relative_to(root.resolve()) if path.is_absolute() else path
    except ValueError:
        rel = None
    if rel is not None and len(rel.parts) >= 2 and rel.parts[0] in ("artifacts", "models"):
        entry = root / rel.parts[0] / rel.parts[1]
        return _warmup_what(entry) if rel.parts[0] == "artifacts" else _conversion_what(entry)
    home = str(Path.home())
    text = str(path)
    return "~" + text[len(home):] if text.startswith(home + os.sep) else text


def _warmup_what(entry: Path) -> str:
    summary = _read_json(entry / "summary.json")
    if not isinstance(summary, dict):
        return f"artifact {entry.name[:12]}"
    final = str(summary.get("final", "model"))
    result = _read_json(entry / Path(final).parent / "train_result.json")
    result = result if isinstance(result, dict) else {}
    base = Path(str(result.get("base_model", "?"))).name
    method = {"lora": "LoRA", "full": "full fine-tune"}.get(str(result.get("method")), str(result.get("method", "?")))
    rows, steps = summary.get("trained_rows", summary.get("rows")), summary.get("steps")
    return f"warmup {entry.name[:8]} of {base} ({method}, {rows} rows, {steps} step{'s' if steps != 1 else ''})"


def _conversion_what(entry: Path) -> str:
    source = _read_json(entry / "tamis-source.json")
    gguf = Path(str(source.get("gguf"))).name if isinstance(source, dict) and source.get("gguf") else entry.name[:12]
    return f"{gguf} as safetensors"


def _conversion_note(entry: Path, index: dict[str, str]) -> str:
    """Whether a run would still use this conversion: its key hashes the GGUF file's content
    (`models._converted_gguf_folder`), so once the file changed (or is gone) it is dead weight."""
    source = _read_json(entry / "tamis-source.json")
    if not isinstance(source, dict) or not source.get("gguf"):
        return ""
    gguf = Path(str(source["gguf"]))
    try:
        st = gguf.stat()
    except OSError:
        return "unused: its GGUF file is gone"
    digest = index.get(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    if digest is None:  # not hashed since it last changed: cannot tell without reading it
        return ""
    current = _hash_parts(f"{gguf.name}:{digest}", str(source.get("conversion", "")))[:24]
    return "" if current == entry.name else "unused: its GGUF file has changed since (or was converted anew)"


def _score_what(meta: Any, names: dict[str, str]) -> tuple[str, Kind]:
    if not isinstance(meta, dict):
        return "scores (no key.json)", "score"
    scorer = str(meta.get("scorer", meta.get("op", "?")))
    params = ", ".join(f"{k}={v}" for k, v in meta.items()
                       if k not in ("op", "scorer", "model", "plugin", "cache_format"))
    what = f"{scorer}({params})" if params else scorer
    if meta.get("model"):
        fp = str(meta["model"])
        what += f" using {names.get(fp, f'model {fp[:12]}')}"
    if meta.get("plugin"):
        what += " [plug-in]"
    return what, ("embeddings" if "embedding" in scorer else "score")


# --------------------------------------------------------------------------- listing


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _entry(area: str, item: Path, names: dict[str, str], index: dict[str, str], rows: bool) -> CacheEntry:
    size, last = _walk(item)
    rel = f"{area}/{item.name}"
    if item.name == TRASH:
        return CacheEntry("other", rel, item, "left by an interrupted `tamis cache clean`", None, size, last)
    temp = _TEMP.match(item.name)
    if temp:
        busy = _alive(int(temp.group("pid")))
        return CacheEntry("other", rel, item, f"unfinished build of {area}/{temp.group('name')[:12]}", None, size,
                          last, f"being built by process {temp.group('pid')}" if busy else "left by a killed process",
                          busy)
    if item.is_symlink() or not item.is_dir():
        return CacheEntry("other", rel, item, "not a tamis entry (file or link)", None, size, last)
    if area == "scores":
        from tamis.runtime.cache import CACHE_FORMAT

        meta = _read_json(item / "key.json")
        what, kind = _score_what(meta, names)
        count, note = _score_rows(item) if rows else (None, "")
        if isinstance(meta, dict) and meta.get("cache_format") != CACHE_FORMAT:
            old = meta.get("cache_format", "tamis-cache-v1")
            unused = f"unused: written in cache format {old}, this version reads {CACHE_FORMAT}"
            note = "; ".join(filter(None, [unused, note]))
        return CacheEntry(kind, rel, item, what, count, size, last, note)
    if area == "models":
        # Loads of a conversion are not recorded (tamis.runtime.models is outside the cache), but every
        # load reads its config.json: its access time (kept by "relatime" to within a day) is the best clue.
        with contextlib.suppress(OSError):
            last = max(last, (item / "config.json").stat().st_atime)
        note = _conversion_note(item, index) or "last use from file access time (to within a day)"
        return CacheEntry("model conversion", rel, item, _conversion_what(item), None, size, last, note)
    if (item / "summary.json").is_file():
        return CacheEntry("warmup", rel, item, _warmup_what(item), None, size, last)
    return CacheEntry("other", rel, item, f"artifact {item.name[:12]}", None, size, last)


def list_cache(root: str | os.PathLike[str] | None = None, *, rows: bool = True) -> CacheListing:
    """Every entry under the cache root (default: the one `tamis run` uses). `rows=False` skips
    counting score rows (the one part that reads shard contents: their ``id`` column)."""
    base = _root(root)
    if not base.is_dir():
        return CacheListing(base, base.exists(), (), ())
    index = _index(base)
    names = model_names(base, index)
    entries: list[CacheEntry] = []
    for area in AREAS:
        folder = base / area
        if not folder.is_dir():  # (a symbolic link to a folder, e.g. models/ on a bigger disk, is followed)
            continue
        for item in sorted(folder.iterdir()):
            entries.append(_entry(area, item, names, index, rows))
    trash = base / TRASH
    if trash.exists():
        size, last = _walk(trash)
        entries.append(CacheEntry("other", TRASH, trash, "left by an interrupted `tamis cache clean`", None, size, last))
    if (base / INDEX).is_file():
        st = (base / INDEX).stat()
        entries.append(CacheEntry("index", INDEX, base / INDEX, f"content hashes of {len(index)} model files "
                                  "(model fingerprints)", None, st.st_size, st.st_mtime, "kept unless --all"))
    entries.sort(key=lambda e: (KIND_ORDER.index(e.kind), -e.last_used, e.name))
    return CacheListing(base, True, tuple(entries), _unexpected(base))


# --------------------------------------------------------------------------- cleaning


def _remove(entry: CacheEntry) -> None:
    """Rename `entry` into a hidden trash folder beside it (atomic: readers see all or nothing),
    then delete it there. A symbolic link is removed, never followed."""
    trash = entry.path.parent / TRASH if entry.path.name != TRASH else entry.path
    if entry.path.name != TRASH:
        trash.mkdir(exist_ok=True)
        gone = trash / f"{entry.path.name}-{secrets.token_hex(4)}"
        os.rename(entry.path, gone)  # FileNotFoundError: removed meanwhile
    else:
        gone = trash
    if gone.is_symlink() or not gone.is_dir():
        gone.unlink()
    else:
        shutil.rmtree(gone)
    if trash.is_dir() and trash != gone:
        with contextlib.suppress(OSError):
            trash.rmdir()  # only when empty: another clean may be using it


def _is_trash(e: CacheEntry) -> bool:
    return e.path.name == TRASH


def clean_cache(root: str | os.PathLike[str] | None = None, *, older_than: float | None = None,
                everything: bool = False, dry_run: bool = False, now: float | None = None) -> CleanResult:
    """Remove entries last used more than `older_than` seconds ago, or every entry (`everything`).

    ``file-hashes.json`` is kept unless `everything` (it is small, and without it every model file is
    hashed again). Builds in progress are never removed; trash left by an interrupted clean always is.
    Raises `NotACacheError` (removing nothing) when the root does not look like a tamis cache."""
    if (older_than is None) == (not everything):
        raise CacheAdminError("tamis cache clean: say what to remove: --older-than DURATION (e.g. 30d) or --all"
                              if older_than is None else "tamis cache clean: give --older-than or --all, not both")
    base = _root(root)
    check_cache_root(base)
    listing = list_cache(base, rows=False)
    now = time.time() if now is None else now
    removed, kept, failed = [], [], []
    for e in listing.entries:
        if e.busy:
            kept.append(e)
            continue
        if everything or _is_trash(e):
            chosen = True
        else:
            assert older_than is not None
            chosen = e.kind != "index" and now - e.last_used > older_than
        if not chosen:
            kept.append(e)
            continue
        if dry_run:
            removed.append(e)
            continue
        try:
            _remove(e)
            removed.append(e)
        except FileNotFoundError:
            continue  # removed by someone else meanwhile
        except OSError as err:
            failed.append((e, str(err)))
    return CleanResult(base, dry_run, None if everything else older_than, tuple(removed), tuple(kept), tuple(failed))


# --------------------------------------------------------------------------- output


def _entry_json(e: CacheEntry, now: float) -> dict[str, Any]:
    return {"kind": e.kind, "entry": e.name, "path": str(e.path), "what": e.what, "rows": e.rows,
            "size_bytes": e.size, "size": human_size(e.size),
            "last_used": _dt.datetime.fromtimestamp(e.last_used, _dt.timezone.utc).isoformat(timespec="seconds"),
            "age_seconds": round(max(0.0, now - e.last_used), 1), "note": e.note or None, "busy": e.busy}


def listing_json(listing: CacheListing, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    return {"root": str(listing.root), "exists": listing.exists,
            "entries": [_entry_json(e, now) for e in listing.entries],
            "totals": {"entries": len(listing.entries), "size_bytes": listing.size, "size": human_size(listing.size),
                       "by_kind": {k: {"entries": n, "size_bytes": b} for k, (n, b) in listing.by_kind().items()}},
            "unexpected": list(listing.unexpected)}


def _table(entries: Iterable[CacheEntry], now: float) -> list[str]:
    rows = [("kind", "entry", "rows", "size", "last use", "what")]
    for e in entries:
        entry = e.name if len(e.name) <= 24 else e.name[:23] + "…"  # --json has the whole key
        what = e.what + (f"  [{e.note}]" if e.note else "")
        rows.append((e.kind, entry, "" if e.rows is None else f"{e.rows:,}", human_size(e.size),
                     f"{_stamp(e.last_used)} ({human_age(now - e.last_used)})", what))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    right = {2, 3}
    return ["  ".join([*(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))), r[5]])
            .rstrip() for r in rows]


def listing_text(listing: CacheListing, now: float | None = None) -> str:
    now = time.time() if now is None else now
    if not listing.exists:
        return f"no tamis cache at {listing.root} (nothing stored yet)"
    lines = [f"tamis cache at {listing.root}"]
    if not listing.entries:
        return lines[0] + ": empty"
    lines += _table(listing.entries, now)
    kinds = "; ".join(f"{k} {n}: {human_size(b)}" for k, (n, b) in listing.by_kind().items())
    lines.append(f"total: {len(listing.entries)} entries, {human_size(listing.size)} ({kinds})")
    if listing.unexpected:
        lines.append(f"note: {listing.root} also holds {', '.join(listing.unexpected)}, which tamis never writes: "
                     "`tamis cache clean` refuses to work there")
    return "\n".join(lines)


def clean_json(result: CleanResult, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    return {"root": str(result.root), "dry_run": result.dry_run, "older_than_seconds": result.older_than,
            "removed": [_entry_json(e, now) for e in result.removed],
            "failed": [{**_entry_json(e, now), "error": why} for e, why in result.failed],
            "kept": len(result.kept), "freed_bytes": result.freed, "freed": human_size(result.freed)}


def clean_text(result: CleanResult, now: float | None = None) -> str:
    now = time.time() if now is None else now
    verb = "would remove" if result.dry_run else "removed"
    if not result.removed and not result.failed:
        return f"nothing to remove in {result.root} ({len(result.kept)} entries kept)"
    lines = [f"{verb} from {result.root}:", *_table(result.removed, now)] if result.removed else []
    for e, why in result.failed:
        lines.append(f"could not remove {e.name}: {why}")
    lines.append(f"{verb} {len(result.removed)} entries, {human_size(result.freed)} "
                 f"({result.freed:,} bytes){' freed' if not result.dry_run else ''}; {len(result.kept)} kept")
    return "\n".join(lines)
