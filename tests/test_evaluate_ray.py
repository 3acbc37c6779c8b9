"""`tamis evaluate --engine ray` (issue 17): the SEM/BM/random fine-tunes run as parallel Ray tasks,
each rebuilding the PFM on its worker, training into the artifact cache and scoring its model there;
the points and held-out losses are the local engine's; a rerun trains nothing, and one after a lost
model trains only that one. The tiny-GPT-2 setup of tests/test_evaluate.py."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from tamis.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_cli_rejects_an_unknown_engine_before_any_work(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n")
    got = runner.invoke(app, ["evaluate", "ifd", "--pool", str(pool), "--pfm", str(tmp_path / "model"),
                              "--eval", "holdout:1", "--engine", "spark", "-o", str(tmp_path / "out")])
    assert got.exit_code != 0 and "--engine 'spark': choose local or ray" in got.output
    assert not (tmp_path / "out").exists()


def _models(report: dict) -> dict[str, dict]:
    return {m["label"]: m for m in report["models"]}


@pytest.mark.slow  # a local run, then three Ray runs (tasks import torch and rebuild the model): ~1-3 min on 2 cores
def test_fine_tunes_run_as_ray_tasks_with_the_local_losses_and_points(tmp_path, tiny_gpt2_dir, local_ray, monkeypatch):
    from test_evaluate import _config

    from tamis.evaluate import heldout
    from tamis.evaluate.run import evaluate
    from tamis.report.evaluate_report import as_json
    from tamis.runtime import training

    cfg = _config(tmp_path, tiny_gpt2_dir, seeds=1, epochs=2)
    local = as_json(evaluate(cfg, tmp_path / "local", log=lambda m: None))
    assert all(not m["training"].get("cached") for m in local["models"] if m["method"] != "PFM")

    # the driver of a Ray run trains nothing and scores only the untrained PFM: the tasks do the rest
    def no_training_here(*a, **kw):
        raise AssertionError("the driver trained a model: Ray tasks should have")

    scored_here: list[int] = []
    real_loss = heldout.heldout_loss

    def counted_loss(*a, **kw):
        scored_here.append(1)
        return real_loss(*a, **kw)

    monkeypatch.setattr(training, "train_warmup", no_training_here)
    monkeypatch.setattr(heldout, "heldout_loss", counted_loss)
    out = tmp_path / "ray"
    args = ["evaluate", cfg.recipes[0], "random", "--pool", cfg.run.pool, "--pfm", tiny_gpt2_dir, "--eval", "holdout:6",
            "--seeds", "1", "--epochs", "2", "--batch", "2", "--lr", "1e-3", "--max-length", "64", "--device", "cpu",
            "--dtype", "fp32", "--cache-dir", str(tmp_path / "ray-cache"), "--no-progress", "-o", str(out),
            "--engine", "ray", "--train-cpus", "1"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "fine-tuning 3 of 3 model(s) as parallel Ray tasks" in first.output
    assert scored_here == [1]  # the PFM's loss; the three trained models were scored by their tasks
    on_ray = json.loads((out / "report.json").read_text())
    assert on_ray["config"]["engine"] == "ray"
    a, b = _models(local), _models(on_ray)
    assert set(a) == set(b) == {"PFM (not fine-tuned)", "BM seed 42", "loss_top seed 42", "random seed 42"}
    for label in a:
        # one torch thread in each task and (OMP_NUM_THREADS=1) in the driver: equal to float rounding
        assert b[label]["heldout"]["loss"] == pytest.approx(a[label]["heldout"]["loss"], abs=1e-5), label
        assert b[label]["heldout"]["tokens"] == a[label]["heldout"]["tokens"]
        if label.startswith("PFM"):
            continue
        assert (b[label]["training"]["cached"], b[label]["training"]["engine"]) == (False, "ray")
        assert b[label]["training"]["steps"] == a[label]["training"]["steps"]
        assert b[label]["training"]["epoch_losses"] == pytest.approx(a[label]["training"]["epoch_losses"], abs=1e-5)
    assert [(p["method"], p["group"], p["selected_size"]) for p in on_ray["points"]] == \
        [(p["method"], p["group"], p["selected_size"]) for p in local["points"]]
    assert [p["value"] for p in on_ray["points"]] == pytest.approx([p["value"] for p in local["points"]], abs=1e-5)

    # a rerun trains nothing, on Ray or here
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "as parallel Ray tasks" not in second.output and "fine-tuning on" not in second.output
    again = json.loads((out / "report.json").read_text())
    assert all(m["training"]["cached"] for m in again["models"] if m["method"] != "PFM")
    assert again["points"] == on_ray["points"]

    # a model lost (a run killed before it finished: `building()` leaves nothing) is the only one trained again
    trained = [p.parent for p in (tmp_path / "ray-cache" / "artifacts").glob("*/summary.json")]
    assert len(trained) == 3
    bm = next(d for d in trained if len(json.loads((d / "summary.json").read_text())["sample_ids"]) == 18)
    shutil.rmtree(bm)
    third = runner.invoke(app, args)
    assert third.exit_code == 0, third.output
    assert "fine-tuning 1 of 3 model(s) as parallel Ray tasks" in third.output
    models = _models(json.loads((out / "report.json").read_text()))
    assert {k: v["training"]["cached"] for k, v in models.items() if not k.startswith("PFM")} == \
        {"BM seed 42": False, "loss_top seed 42": True, "random seed 42": True}
    assert models["BM seed 42"]["heldout"] == b["BM seed 42"]["heldout"]
