"""The command line: exit codes, machine-readable output."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from tamis.cli import app

runner = CliRunner()
NINE = ["alpagasus", "instag", "nuggets", "superfiltering", "ifd", "less", "deita", "instruction_mining", "instructiongpt4"]


def test_check_ok_and_failure(tmp_path):
    ok = runner.invoke(app, ["check", "ifd", "less"])
    assert ok.exit_code == 0, ok.output
    bad = tmp_path / "bad.tamis"
    bad.write_text("score ifdd | rank | top 10%\n")
    res = runner.invoke(app, ["check", str(bad)])
    assert res.exit_code == 1
    assert f"{bad}:1:7: unknown scorer 'ifdd'" in res.output
    assert "^^^^" in res.output and "did you mean `ifd`?" in res.output


def test_feasibility_json_keys():
    res = runner.invoke(app, ["feasibility", *NINE, "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["recipe"] for r in rows] == NINE
    assert set(rows[0]) == {"recipe", "trained_llms", "small_proxy", "steps", "llm_uses", "reproducible", "model_free",
                            "dataset_free", "api_free", "simplicity", "flexibility", "feasibility"}
    sf = rows[3]
    assert (sf["trained_llms"], sf["small_proxy"], sf["steps"], sf["llm_uses"]) == (1, True, 3, 1)


def test_feasibility_markdown_and_html(tmp_path):
    out = tmp_path / "f.html"
    res = runner.invoke(app, ["feasibility", *NINE, "--html", str(out)])
    assert res.exit_code == 0, res.output
    assert "| superfiltering | 1* | 3(1*) | ✓ | 3 |" in res.stdout
    page = out.read_text()
    assert page.count("<svg") == len(NINE) and "<table>" in page


def test_explain_text_json_dot(tmp_path):
    res = runner.invoke(app, ["explain", "ifd"])
    assert res.exit_code == 0 and "score ifd using warmup(pfm)" in res.stdout and "(fused)" in res.stdout
    js = runner.invoke(app, ["explain", "ifd", "--json"])
    data = json.loads(js.stdout)
    assert {"nodes", "edges", "graph"} <= set(data)
    assert any(n.get("op") == "topk" for n in data["nodes"])
    dot = tmp_path / "g.dot"
    res = runner.invoke(app, ["explain", "ifd", "--dot", str(dot)])
    assert res.exit_code == 0 and dot.read_text().startswith("digraph recipe {")


def test_efficiency_command_json_and_plot(tmp_path):
    plot = tmp_path / "eff.png"
    res = runner.invoke(app, ["efficiency", "--json", "--plot", str(plot)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    text = json.dumps(data)
    assert "IFD" in text and "AlpaGasus" in text
    assert plot.stat().st_size > 10_000


def test_efficiency_command_rejects_bad_points(tmp_path):
    bad = tmp_path / "p.csv"
    bad.write_text("method,sem,counterpart,group,value,selected_size,pool_size,source\nx,m,bm,same_wins,1.2,10,100,me\n")
    res = runner.invoke(app, ["efficiency", str(bad)])
    assert res.exit_code == 1
    assert "row" in res.output and "group" in res.output


def test_report_page_has_table_graphs_and_efficiency(tmp_path):
    out = tmp_path / "r.html"
    res = runner.invoke(app, ["report", "ifd", "alpagasus", "--html", str(out)])
    assert res.exit_code == 0, res.output
    page = out.read_text()
    assert page.count("<svg") >= 3 and "Feasibility" in page and "IFD" in page


def test_run_refuses_an_output_that_is_a_dataset_the_recipe_loads(tmp_path):
    from typer.testing import CliRunner

    from tamis.cli import app

    target = tmp_path / "target.jsonl"
    target.write_text('{"instruction": "q", "input": "", "output": "a"}\n')
    before = target.read_bytes()
    recipe = tmp_path / "r.tamis"
    recipe.write_text(f'data t = load("{target}")\nscore length on t as n | score length | rank | top 1\n')
    pool = Path(__file__).parent / "fixtures" / "data" / "pool_small.jsonl"
    res = CliRunner().invoke(app, ["run", str(recipe), "--pool", str(pool), "-o", str(target), "--no-cache",
                                   "--no-progress"])
    assert res.exit_code == 1 and target.read_bytes() == before
