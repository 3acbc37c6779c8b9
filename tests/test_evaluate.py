"""`tamis evaluate`: wins-rate and PIR/SDF arithmetic by hand, the judge's position-bias handling,
resume after a kill, and one end-to-end run on the tiny GPT-2 whose points file `tamis efficiency` reads."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from tamis.evaluate import metrics as M
from tamis.evaluate.pairwise import (LOSS, TIE, WIN, Verdict, WinTieLoss, judge_pair, outcome, pair_conversations,
                                     tally)
from tamis.runtime.judge_prompts import VICUNA_PAIRWISE, parse_score_pair

LOSS_RECIPE = 'score loss using pfm with template="alpaca", max_length=128 | rank by loss desc | top 25%\n'


# --------------------------------------------------------------------------- arithmetic


def v(a: float, b: float) -> Verdict:
    return Verdict(f"{a} {b}", (a, b))


@pytest.mark.parametrize("first, second, expected", [
    # (A's scores as assistant 1, B's as 2), then (B as 1, A as 2): review_eval_score.py's nine cases
    (v(8, 6), v(6, 8), WIN), (v(8, 6), v(7, 7), WIN), (v(7, 7), v(6, 8), WIN),
    (v(8, 6), v(8, 6), TIE), (v(6, 8), v(6, 8), TIE), (v(7, 7), v(7, 7), TIE),
    (v(6, 8), v(7, 7), LOSS), (v(7, 7), v(8, 6), LOSS), (v(6, 8), v(8, 6), LOSS),
])
def test_two_orders_combine_as_the_reference(first, second, expected):
    assert outcome(first, second) == expected


def test_an_unreadable_verdict_is_a_tie_in_its_order():
    garbage = Verdict("[System]", None, "judge's first line is not two numbers")
    assert outcome(garbage, v(6, 8)) == WIN  # tie + win
    assert outcome(garbage, garbage) == TIE


def test_wins_rate_by_hand():
    wtl = tally([WIN] * 5 + [TIE] * 3 + [LOSS] * 2)
    assert (wtl.wins, wtl.ties, wtl.losses, wtl.n) == (5, 3, 2, 10)
    assert wtl.wins_rate == pytest.approx((5 - 2) / 10 + 1)  # 1.3
    assert WinTieLoss(0, 0, 4).wins_rate == 0.0 and WinTieLoss(4, 0, 0).wins_rate == 2.0
    assert (WinTieLoss(1, 2, 3) + WinTieLoss(3, 2, 1)).wins_rate == pytest.approx(1.0)


def test_score_pair_parsed_as_cherry_parse_score():
    assert parse_score_pair("8 7\nBecause…") == ((8.0, 7.0), None)
    assert parse_score_pair("9,3")[0] == (9.0, 3.0)  # a comma is a separator
    assert parse_score_pair("8, 7")[0] is None  # …so ", " gives three parts, as in the reference
    assert parse_score_pair("Assistant 1: 8")[0] is None
    assert parse_score_pair("8 7 6")[0] is None


def test_pir_sdf_and_bench_ratio_by_hand():
    assert M.loss_ratio(2.0, 1.6) == pytest.approx(1.25)  # BM loss 2.0, SEM loss 1.6: SEM did 25 % better
    assert M.method_sdf(5, 50) == pytest.approx(0.1)
    pts = [M.point("mine", "m", M.WINS, 1.52, 5, 50, "seed 1"), M.point("mine", "m", M.WINS, 1.48, 5, 50, "seed 2"),
           M.point("mine", "m", M.BENCH, 1.2, 5, 50, "seed 1"), M.point("mine", "m", M.BENCH, 1.0, 5, 50, "seed 2")]
    assert M.pir_by_group(pts) == {"mine": {M.WINS: pytest.approx(1.50), M.BENCH: pytest.approx(1.1)}}
    s = M.spreads(pts)["mine"][M.BENCH]
    assert (s.mean, s.std, s.low, s.high, s.n) == (pytest.approx(1.1), pytest.approx(math.sqrt(0.02)), 1.0, 1.2, 2)


def test_points_file_is_read_by_the_efficiency_report(tmp_path):
    from tamis.report.efficiency import compute_efficiency, load_points

    pts = [M.point("mine", "m", M.WINS, 1.52, 5000, 50000, "seed 1"),
           M.point("mine", "m", M.WINS, 1.48, 5000, 50000, "seed 2")]
    f = tmp_path / "points.csv"
    f.write_text(M.points_csv(pts))
    result = compute_efficiency(load_points([f]))
    mine = next(m for m in result.methods if m.method == "mine")
    assert (mine.pir, mine.sdf, mine.published) == (pytest.approx(1.50), pytest.approx(0.1), False)


# --------------------------------------------------------------------------- the judge's position bias


class ScriptedJudge:
    """A judge whose verdict is a rule of the two answers it is shown (a real judge's interface)."""

    name = fingerprint = "scripted"

    def __init__(self, rule):
        self.rule = rule
        self.seen: list[tuple[str, str]] = []

    def first_lines(self, conversations, progress):
        out = []
        for conv in conversations:
            text = conv[1]["content"]
            one = text.split("[The Start of Assistant 1's Answer]\n")[1].split("\n\n[The End")[0]
            two = text.split("[The Start of Assistant 2's Answer]\n")[1].split("\n\n[The End")[0]
            self.seen.append((one, two))
            out.append(self.rule(one, two))
        return out


QUESTIONS = ["Name a fruit.", "What is 2 + 2?", "Say hello."]
SEM = ["An apple, a crisp and sweet fruit.", "2 + 2 is 4.", "Hello there, nice to meet you!"]
BM = ["Pear.", "4", "Hi."]


def test_a_judge_that_prefers_the_first_answer_gives_all_ties():
    judge = ScriptedJudge(lambda one, two: "9 1")
    outcomes, verdicts = judge_pair(judge, QUESTIONS, SEM, BM)
    assert outcomes == [TIE] * 3
    assert tally(outcomes).wins_rate == 1.0
    # both orders were asked: SEM first for every question, then BM first
    assert judge.seen == list(zip(SEM, BM)) + list(zip(BM, SEM))
    assert all(x.scores == (9.0, 1.0) for x in verdicts)


def test_a_real_preference_survives_both_orders():
    longer = ScriptedJudge(lambda one, two: "8 3" if len(one) > len(two) else "3 8")
    outcomes, _ = judge_pair(longer, QUESTIONS, SEM, BM)
    assert outcomes == [WIN] * 3 and tally(outcomes).wins_rate == 2.0
    outcomes, _ = judge_pair(longer, QUESTIONS, BM, SEM)
    assert tally(outcomes).wins_rate == 0.0


def test_pair_conversations_use_the_vicuna_prompt():
    convs = pair_conversations(["Q?"], ["a"], ["b"])
    assert convs[0][0] == {"role": "system", "content": VICUNA_PAIRWISE.system}
    assert convs[0][1]["content"].startswith("[Question]\nQ?\n\n[The Start of Assistant 1's Answer]\na\n\n")
    assert "[The Start of Assistant 1's Answer]\nb\n\n" in convs[1][1]["content"]
    with pytest.raises(Exception, match="one answer of each model"):
        pair_conversations(["Q?"], ["a"], [])


# --------------------------------------------------------------------------- runs on the tiny GPT-2


def _pool(path: Path, n: int) -> Path:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 60), rng.randint(1, 60)
            f.write(json.dumps({"instruction": f"What is {a} plus {b}?", "input": "",
                                "output": f"{a} plus {b} is {a + b}."}) + "\n")
    return path


def _config(tmp_path: Path, pfm: str, seeds: int, epochs: int = 2, **kw):
    from tamis.evaluate.run import EvalConfig, TrainingSettings
    from tamis.runtime.executor import RunConfig

    recipe = tmp_path / "loss_top.tamis"
    recipe.write_text(LOSS_RECIPE)
    pool = _pool(tmp_path / "pool.jsonl", 24)
    return EvalConfig(recipes=[str(recipe), "random"], eval="holdout:6", seeds=seeds,
                      run=RunConfig(pool=str(pool), pfm=pfm, device="cpu", dtype="fp32",
                                    cache_dir=str(tmp_path / "cache"), progress=False),
                      training=TrainingSettings(epochs=epochs, batch=2, lr=1e-3, max_length=64), **kw)


@pytest.mark.slow  # three evaluate() runs: ≈25–90 s on the shared 2-core VM
def test_resume_after_a_kill_retrains_nothing_finished(tmp_path, tiny_gpt2_dir, monkeypatch):
    from tamis.evaluate.run import evaluate
    from tamis.runtime import training

    real = training.train_warmup
    trained: list[int] = []

    def killed_on_third(lm, rows, config, out, progress=True):
        if len(trained) == 2:
            raise KeyboardInterrupt  # the kill, in the middle of the third model's training
        trained.append(len(rows))
        return real(lm, rows, config, out, progress=progress)

    cfg = _config(tmp_path, tiny_gpt2_dir, seeds=1, epochs=1)
    monkeypatch.setattr(training, "train_warmup", killed_on_third)
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg, tmp_path / "out", log=lambda m: None)
    assert trained == [18, 4]  # BM (the 18 rows left after holding out 6), then the recipe's top 25 % (4.5 rounds to 4)

    again: list[int] = []

    def counting(lm, rows, config, out, progress=True):
        again.append(len(rows))
        return real(lm, rows, config, out, progress=progress)

    monkeypatch.setattr(training, "train_warmup", counting)
    result = evaluate(cfg, tmp_path / "out", log=lambda m: None)
    assert again == [4]  # only the random control, which the kill cut short
    cached = {m.label: m.training["cached"] for m in result.models if m.method != "PFM"}
    assert cached == {"BM seed 42": True, "loss_top seed 42": True, "random seed 42": False}


@pytest.mark.slow
def test_end_to_end_points_accepted_by_tamis_efficiency(tmp_path, tiny_gpt2_dir, tiny_judge):
    from typer.testing import CliRunner

    from tamis.cli import app

    cfg = _config(tmp_path, tiny_gpt2_dir, seeds=2)
    out = tmp_path / "eval"
    args = ["evaluate", cfg.recipes[0], "random", "--pool", cfg.run.pool, "--pfm", tiny_gpt2_dir, "--eval", "holdout:6",
            "--seeds", "2", "--epochs", "2", "--batch", "2", "--lr", "1e-3", "--max-length", "64",
            "--max-new-tokens", "8", "--judge", tiny_judge, "--device", "cpu", "--dtype", "fp32",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "-o", str(out)]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    for name in ("points.csv", "report.md", "report.html", "report.json", "evaluate.png", "efficiency.png",
                 "judgements.jsonl"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert set(report["outputs"]) == {str(out / n) for n in ("points.csv", "report.md", "report.html", "evaluate.png",
                                                             "efficiency.png", "judgements.jsonl")}
    # 2 seeds x (loss_top, random) x the held-out bench ratio; the tiny judge writes no score pairs, so no
    # wins-rate is placed (and the report says why)
    rows = (out / "points.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and all(",same_model_bench," in r for r in rows[1:])
    assert any("verdicts were two numbers" in n for n in report["notes"])
    assert len(report["comparisons"]) == 2 * 3  # per seed: loss_top vs BM, loss_top vs random, random vs BM
    eff = CliRunner().invoke(app, ["efficiency", str(out / "points.csv"), "--json"])
    assert eff.exit_code == 0, eff.output
    mine = {m["method"]: m for m in json.loads(eff.output)["methods"] if not m["published"]}
    assert set(mine) == {"loss_top (eval)", "random (eval)"}
    assert mine["loss_top (eval)"]["sdf"] == pytest.approx(4 / 18)
    second = CliRunner().invoke(app, args)  # everything from the cache
    assert second.exit_code == 0 and "fine-tuning on" not in second.output
