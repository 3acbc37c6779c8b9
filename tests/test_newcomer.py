"""A newcomer's first hour (issue 10): discoverable operators, consistent step numbers, clear reports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from tamis.cli import app
from tamis.dsl import registry as reg
from tamis.dsl.compile import compile_file

runner = CliRunner()
FIX = Path(__file__).parent / "fixtures" / "data"
NINE = ["alpagasus", "instag", "nuggets", "superfiltering", "ifd", "less", "deita", "instruction_mining", "instructiongpt4"]


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and re.fullmatch(r"tamis \d+\.\d+\.\d+\n", res.output)


def test_ops_lists_every_registry_entry_and_says_which_run():
    res = runner.invoke(app, ["ops", "--json"])
    items = json.loads(res.output)
    names = {(e["family"], e["name"]) for e in items}
    assert {("scorer", n) for n in reg.SCORERS} <= names and {("sampler", n) for n in reg.SAMPLERS} <= names
    assert {("function", n) for n in reg.FUNCTIONS} <= names and {("data", n) for n in reg.DATA_CTORS} <= names
    runnable = {e["name"] for e in items if e["runnable"]}
    assert {"ifd", "rating", "kcenter", "pct", "warmup", "grads", "icl_loss", "tags", "cluster", "evolve", "subsets",
            "fit", "predict"} <= runnable
    assert [e["name"] for e in items if not e["runnable"]] == []  # every built-in has its kernel now
    detail = runner.invoke(app, ["ops", "rating"]).output
    assert "prompt: string one of alpagasus" in detail and "gpt4life/alpagasus" in detail
    typo = runner.invoke(app, ["ops", "raiting"])
    assert typo.exit_code == 1 and "did you mean `rating`" in typo.output


def test_explain_numbers_steps_as_feasibility_counts_them():
    for name in NINE:
        c = compile_file(name)
        shown = [int(m) for m in re.findall(r"\[step (\d+)", runner.invoke(app, ["explain", name]).output)]
        assert max(shown) == c.feasibility().steps, name


def test_the_run_report_and_console_say_what_a_newcomer_needs(tmp_path):
    pool = tmp_path / "pool.jsonl"
    rows = [{"id": "a", "instruction": "q", "input": "", "output": "one two three"},
            {"id": "b", "instruction": "q", "input": "", "output": "..."}]
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "r.tamis"
    recipe.write_text("score mtld | rank | top 2\n")
    res = runner.invoke(app, ["run", str(recipe), "--pool", str(pool), "-o", str(tmp_path / "sel.jsonl"),
                              "--scores", str(tmp_path / "s.parquet"), "--no-cache", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "1 of 2 rows have no score (no words in output: 1)" in res.output
    assert "budget 2 rows, 1 picked" in res.output
    md = (tmp_path / "sel.report.md").read_text()
    assert "PFM: none given" in md and "| computed now |" in md


def test_a_model_run_says_its_dtype_and_why(tiny_gpt2_dir, tmp_path):
    recipe = tmp_path / "r.tamis"
    recipe.write_text('score loss with template="bare", max_length=64 | rank | top 1\n')
    res = runner.invoke(app, ["run", str(recipe), "--pool", str(FIX / "pool_small.jsonl"), "--pfm", tiny_gpt2_dir,
                              "-o", str(tmp_path / "sel.jsonl"), "--no-cache", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert re.search(r"model pfm: cpu, (fp32|bf16) \(auto: ", res.output), res.output


def test_the_feasibility_page_has_readable_text_a_legend_and_links(tmp_path):
    out = tmp_path / "f.html"
    assert runner.invoke(app, ["feasibility", "ifd", "deita", "--html", str(out)]).exit_code == 0
    page = out.read_text()
    assert page.count("<text") > 10  # labels are SVG text, not outlines
    assert "rank 1 is the simplest" in page and "<b>1*</b>" in page and "class='key'" in page
    assert "<a href='https://github.com/tianyi-lab/Cherry_LLM'>" in page


def test_a_copied_model_keeps_its_fingerprint_and_an_edited_one_does_not(tiny_gpt2_dir, tmp_path, monkeypatch):
    """Model identity is content, not path or mtime: a new clone or venv reuses cached scores."""
    import shutil

    from tamis.runtime.models import load_causal_lm

    monkeypatch.setenv("TAMIS_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_gpt2_dir, copy)
    a = load_causal_lm(tiny_gpt2_dir, dtype="fp32").fingerprint
    assert load_causal_lm(str(copy), dtype="fp32").fingerprint == a
    config = copy / "config.json"
    config.write_text(config.read_text() + " ")  # same mtime granularity or not: the bytes differ
    assert load_causal_lm(str(copy), dtype="fp32").fingerprint != a
    assert (tmp_path / "cache" / "file-hashes.json").is_file()


def test_a_warmup_keeps_its_optimizer_state_only_when_asked_or_needed(tiny_gpt2_dir, tmp_path):
    from tamis.dsl.compile import compile_text
    from tamis.runtime.executor import LocalExecutor, RunConfig

    cfg = RunConfig(pool=str(FIX / "pool_small.jsonl"), pfm=tiny_gpt2_dir, dtype="fp32", cache_dir=str(tmp_path / "c"),
                    progress=False)
    for flag, kept in (("", False), (", optimizer_state=true", True)):
        text = f"score ifd using warmup(pfm, 50%, lora(r=4), lr=1e-3, batch=2{flag}) with max_length=128 | rank | top 2"
        LocalExecutor(compile_text(text).graph, cfg).run()
        saved = list((tmp_path / "c").rglob("optimizer.safetensors"))
        assert bool(saved) == kept, (flag, saved)
    less = compile_file("less").graph
    assert [a["params"]["optimizer_state"] for _, a in less.nodes(data=True) if a.get("ctor") == "warmup"] == [True]
