"""Small real pools written for tests (no downloads)."""

from __future__ import annotations

from pathlib import Path


def chatter_pool(path: Path, rows: int) -> Path:
    """The first `rows` distinct chatterbot-corpus Q/A pairs as a JSONL pool at `path`."""
    from tamis.runtime.data import chatterbot_pairs
    from tamis.runtime.outputs import write_jsonl

    frame = chatterbot_pairs().frame
    write_jsonl(frame.unique(subset=["instruction", "input", "output"], keep="first", maintain_order=True).head(rows),
                path)
    return path
