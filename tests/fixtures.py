"""One helper runs every fixture folder: recipe in → expected errors, graph or metrics out."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
_EXPECT = re.compile(r"#\s*expect:\s*(\d+):(\d+):\s*(.*)")


def bad_cases() -> list[Path]:
    return sorted((FIXTURES / "bad").glob("*.tamis"))


def good_cases() -> list[Path]:
    return sorted((FIXTURES / "good").glob("*.tamis"))


def expected_error(path: Path) -> tuple[int, int, list[str]]:
    """First line `# expect: LINE:COL: message | hint fragment | …`."""
    m = _EXPECT.match(path.read_text().splitlines()[0])
    assert m, f"{path.name}: first line must be '# expect: LINE:COL: message'"
    return int(m.group(1)), int(m.group(2)), [s.strip() for s in m.group(3).split("|")]


def expected_json(path: Path, actual: dict) -> dict:
    """The `.expected.json` beside a fixture; TAMIS_UPDATE_FIXTURES=1 rewrites it from `actual`."""
    exp = path.with_suffix(".expected.json")
    if os.environ.get("TAMIS_UPDATE_FIXTURES") == "1" or not exp.exists():
        exp.write_text(json.dumps(actual, indent=2, sort_keys=True) + "\n")
    return json.loads(exp.read_text())
