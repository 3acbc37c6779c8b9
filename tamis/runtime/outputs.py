"""Atomic output writers.

A run that dies (killed, out of memory, a bug in a writer) must never leave a
half-written selection that a later step mistakes for a result, nor destroy the
previous good file. Every writer here therefore writes a temporary file in the
*same directory* as the target (so the final rename never crosses filesystems),
flushes and fsyncs it, then ``os.replace``s it over the target and fsyncs the
directory. On any exception the temporary file is removed and the target is
untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import polars as pl

from tamis.errors import TamisError

__all__ = ["OutputError", "atomic_dir", "atomic_path", "check_outputs", "clean_stale_temps", "write_output_set", "fsync_tree", "write_bytes", "write_json", "write_jsonl", "write_parquet", "write_text"]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path next to `path`; on success it replaces `path`.

    The temporary file is created empty with mode 0o666 minus the umask (what a
    plain ``open(path, "w")`` would give), so outputs are not left owner-only.
    Parent directories are created.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(target)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_dir(final: Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a fresh hidden sibling directory of `final` to build into; on success it is
    fsynced and renamed to `final` (an empty directory there is replaced). On any exception
    it is deleted and nothing appears. `keep_existing`: if a non-empty `final` appeared
    meanwhile (another process built the same thing), keep that one and drop ours."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()  # rename cannot replace a directory, even an empty one
        try:
            os.rename(tmp, final)
        except OSError:
            if not (keep_existing and final.is_dir()):
                raise
            shutil.rmtree(tmp)  # lost a race to an identical build: keep the winner's
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_file(Path(dirpath) / name)
        fsync_dir(Path(dirpath))


def _create_temp(target: Path) -> Path:
    """An exclusive new file; hidden, and named after the target to be recognisable."""
    while True:
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; not every platform allows opening a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the data file is synced
    finally:
        os.close(fd)


def _write_with(path: str | Path, writer: Callable[[Path], Any]) -> Path:
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_jsonl(frame: pl.DataFrame, path: str | Path) -> Path:
    """One JSON object per row (nested `messages` kept as lists of objects)."""
    return _write_with(path, frame.write_ndjson)


def write_parquet(frame: pl.DataFrame, path: str | Path) -> Path:
    return _write_with(path, frame.write_parquet)


def write_json(obj: Any, path: str | Path, *, indent: int | None = 2) -> Path:
    """JSON with non-ASCII text kept readable; serialised *before* touching disk, so
    an unserialisable object fails without creating anything."""
    text = json.dumps(obj, ensure_ascii=False, indent=indent) + "\n"
    return write_text(text, path)


def write_text(text: str, path: str | Path) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return _write_with(path, write)


def write_bytes(data: bytes, path: str | Path) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return _write_with(path, write)


# --------------------------------------------------------------------------- checks before a run


class OutputError(TamisError):
    """An output path that cannot or must not be written: refused before any work."""


def check_outputs(outputs: dict[str, Path], inputs: list[Path]) -> None:
    """Refuse, before any work, outputs that would overwrite an input (also through a link,
    `..` or a hard link), collide with each other, or cannot be written: a directory, a path
    under a regular file, a folder that is not writable. `outputs` maps the flag to its path."""
    seen: dict[Path, str] = {}
    real_inputs = [(p, p.resolve()) for p in inputs if p.exists()]
    for flag, path in outputs.items():
        real = path.resolve()
        for given, real_in in real_inputs:
            if real_in.is_dir() and real.is_relative_to(real_in):  # a folder pool (`datasets`): its files are inputs
                raise OutputError(f"{flag} {path}: inside the input folder {given}; tamis never writes into its "
                                  "inputs — choose another output path")
            if real == real_in or (path.exists() and os.path.samefile(path, given)):
                raise OutputError(f"{flag} {path}: that is the input {given}; tamis never overwrites its inputs "
                                  "— choose another output path")
        if real in seen:
            raise OutputError(f"{flag} {path}: the same file as {seen[real]}; give each output its own path")
        seen[real] = flag
        if path.is_dir():
            raise OutputError(f"{flag} {path}: is a directory; give a file path, e.g. {path / 'selected.jsonl'}")
        ancestor = path.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise OutputError(f"{flag} {path}: {ancestor} is a file, so nothing can be written under it")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise OutputError(f"{flag} {path}: the folder {ancestor} is not writable")


def clean_stale_temps(path: Path) -> int:
    """Remove temporary files a killed writer left beside `path` (`.NAME.tmp-PID-…` of a
    process that is gone); returns how many."""
    removed = 0
    if not path.parent.is_dir():
        return 0
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            pid = int(tmp.name[len(path.name) + 6:].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            with contextlib.suppress(OSError):
                if tmp.is_dir():
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()
                removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_output_set(writers: list[tuple[Path, Callable[[Path], Any]]], manifest: Path,
                     manifest_body: Callable[[dict[str, str]], Any]) -> None:
    """Write a run's files so that no reader mistakes a mixed set for a result.

    The manifest (the JSON report) is removed first and written last, listing every other
    file's SHA-256: while it is absent the set is incomplete, and a file that does not match
    its digest is not part of this run. Each file is itself written atomically.
    """
    with contextlib.suppress(FileNotFoundError):
        manifest.unlink()
    digests: dict[str, str] = {}
    for path, writer in writers:
        clean_stale_temps(path)
        _write_with(path, writer)
        digests[str(path)] = file_digest(path)
    clean_stale_temps(manifest)
    write_json(manifest_body(digests), manifest)


FRAME_FORMATS = {".jsonl": "JSON lines", ".json": "a JSON array of records (Alpaca layout)", ".parquet": "Parquet"}


def frame_writer(path: Path, flag: str) -> Callable[[pl.DataFrame], Callable[[Path], Any]]:
    """How to write a frame to `path`, chosen by its extension (checked before any work):
    .jsonl, .json (an array of records) or .parquet; anything else is refused."""
    suffix = path.suffix.lower()
    if suffix not in FRAME_FORMATS:
        known = ", ".join(f"{k} ({v})" for k, v in FRAME_FORMATS.items())
        raise OutputError(f"{flag} {path}: unknown output format {suffix or '(no extension)'!r}; use {known}")
    if suffix == ".jsonl":
        return lambda frame: frame.write_ndjson
    if suffix == ".json":
        return lambda frame: (lambda tmp: tmp.write_text(json.dumps(frame.to_dicts(), ensure_ascii=False, indent=1)
                                                          + "\n", encoding="utf-8"))
    return lambda frame: frame.write_parquet
