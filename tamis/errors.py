"""One root for every error tamis raises on purpose.

`TamisError` is the root. Recipe errors carry a source span and render as
``file:line:col: message`` followed by the source line and a caret, the way a
compiler does; data errors name the file, row and field.
"""

from __future__ import annotations

from dataclasses import dataclass


class TamisError(Exception):
    """Root of all errors tamis raises deliberately."""


@dataclass(frozen=True)
class Span:
    """A region of recipe source: 1-based line/column, 0-based character offsets."""

    line: int = 1
    column: int = 1
    end_line: int = 1
    end_column: int = 1
    start: int = 0
    end: int = 0


@dataclass(frozen=True)
class ParamSpan(Span):
    """A region of a `--param NAME=VALUE` given on the command line (`text`), not of the recipe: an error
    there shows that text, so the caret is under the value the user typed."""

    text: str = ""


class RecipeError(TamisError):
    """A recipe is wrong: syntax, names, types, composition."""

    def __init__(
        self,
        message: str,
        span: Span | None = None,
        *,
        source: str | None = None,
        path: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.span = span
        self.source = source
        self.path = path
        self.hint = hint
        self.notes: list[str] = []  # further located messages (where a spliced recipe was spliced)

    def with_source(self, source: str, path: str | None) -> "RecipeError":
        """Attach the text the span points into (kept if already set, e.g. by a spliced recipe)."""
        if self.source is None:
            self.source, self.path = source, path
        return self

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def column(self) -> int | None:
        return self.span.column if self.span else None

    def render(self) -> str:
        where = self.path or "<recipe>"
        if self.span is None:
            head = f"{where}: {self.message}"
        else:
            head = f"{where}:{self.span.line}:{self.span.column}: {self.message}"
        lines = [head]
        if self.span is not None and self.source is not None:
            src_lines = self.source.splitlines() or [""]
            if 1 <= self.span.line <= len(src_lines):
                text = src_lines[self.span.line - 1]
                lines.append(f"  {text}")
                width = 1
                if self.span.end_line == self.span.line:
                    width = max(1, self.span.end_column - self.span.column)
                # under a tab, a tab: the caret lines up however wide the terminal draws tabs
                pad = "".join("\t" if ch == "\t" else " " for ch in text[:self.span.column - 1])
                lines.append("  " + pad + "^" * width)
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


class DataError(TamisError):
    """Input data is wrong. `problems` lists (file, row, field, message) for every bad record."""

    def __init__(self, message: str, problems: list["RowProblem"] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.problems = problems or []

    def __str__(self) -> str:
        shown = "\n".join(f"  {p}" for p in self.problems[:20])
        more = f"\n  … and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        return f"{self.message}\n{shown}{more}" if shown else self.message


@dataclass(frozen=True)
class RowProblem:
    file: str
    row: int  # 1-based record number (line number for JSONL)
    field: str | None
    message: str

    def __str__(self) -> str:
        field = f" field {self.field!r}:" if self.field else ""
        return f"{self.file}: row {self.row}:{field} {self.message}"


class ModelError(TamisError):
    """A model cannot be loaded, or cannot do what the recipe asks of it."""


class PluginError(TamisError):
    """A plug-in file or package could not be loaded, or declares an operator wrongly."""
