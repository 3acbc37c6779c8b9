"""The README's tour works as written: every ```tamis block compiles, every shown CLI output is current."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tamis.cli import app
from tamis.dsl.compile import compile_text

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```tamis\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_tamis_blocks():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_recipe_block_compiles(i):
    compile_text(BLOCKS[i], path=str(README))


def test_readme_explain_output_is_current():
    shown = re.search(r"\$ tamis explain ifd\n(.*?)```", README.read_text(), flags=re.S).group(1)
    res = CliRunner().invoke(app, ["explain", "ifd"])
    assert res.stdout.strip() == shown.strip()


def test_readme_table_3_is_current():
    text = README.read_text()
    res = CliRunner().invoke(app, ["feasibility", "alpagasus", "instag", "nuggets", "superfiltering", "ifd", "less",
                                   "deita", "instruction_mining", "instructiongpt4"])
    for line in res.stdout.splitlines():
        if line.startswith("| ") and "Method" not in line:
            assert line in text, line
