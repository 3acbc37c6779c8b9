"""`tamis evaluate`'s outputs: the points file, Markdown/HTML/JSON reports, and two figures.

``DIR/points.csv`` is the efficiency report's points file (`tamis efficiency DIR/points.csv`,
`tamis report --points DIR/points.csv`); ``DIR/evaluate.png`` draws the held-out losses per model
and seed and the judge's wins-ties-losses; ``DIR/efficiency.png`` places the evaluated methods on the
survey's efficiency graph among the published ones. The set is written as `tamis run` writes its
outputs: each file atomically, ``report.json`` removed first and written last with every other
file's SHA-256.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Sequence

from tamis.evaluate import metrics as M
from tamis.evaluate.run import Comparison, EvalResult, ModelRun


# --------------------------------------------------------------------------- tables


def loss_rows(result: EvalResult) -> list[list[str]]:
    """Held-out loss per method: mean ± std over seeds (and the PFM before fine-tuning)."""
    by: dict[str, list[ModelRun]] = {}
    for m in result.models:
        by.setdefault(m.method, []).append(m)
    rows = []
    for method, runs in by.items():
        loss = M.Spread.of([r.loss["loss"] for r in runs])
        ppl = M.Spread.of([r.loss["ppl"] for r in runs])
        size = result.selections.get(method, {}).get("size", runs[0].rows if method == "BM" else 0)
        rows.append([method, f"{size:,}" if method != "PFM" else "-", loss.text(4), ppl.text(2), str(loss.n)])
    return rows


LOSS_HEADER = ["Model", "Trained on", "Held-out loss (mean ± sd)", "Perplexity", "Seeds"]


def wins_rows(result: EvalResult) -> list[list[str]]:
    by: dict[tuple[str, str], list[Comparison]] = {}
    for c in result.comparisons:
        by.setdefault((c.a, c.b), []).append(c)
    rows = []
    for (a, b), comps in by.items():
        total = comps[0].wtl
        for c in comps[1:]:
            total = total + c.wtl
        rate = M.Spread.of([c.wtl.wins_rate for c in comps if c.wtl.n])
        valid = sum(c.valid for c in comps)
        verdicts = sum(c.verdicts for c in comps)
        rows.append([f"{a} vs {b}", f"{total.wins} / {total.ties} / {total.losses}", rate.text(3),
                     f"{valid} of {verdicts}"])
    return rows


WINS_HEADER = ["Comparison", "Wins / ties / losses (all seeds)", "Wins-rate (mean ± sd)", "Verdicts that parse"]


def pir_rows(result: EvalResult) -> list[list[str]]:
    spreads = M.spreads(result.points)
    means = M.pir_by_group(result.points)
    rows = []
    for method, groups in spreads.items():
        size = next(p for p in result.points if p.method == method)
        for group, s in groups.items():
            rng = f"{s.low:.3f} – {s.high:.3f}"
            rows.append([method, group, f"{means[method][group]:.3f}", f"{s.std:.3f}" if s.std is not None else "-",
                         rng, str(s.n), f"{M.method_sdf(size.selected_size, size.pool_size):.4f}"])
    return rows


PIR_HEADER = ["Method", "Group", "PIR (Eq. 1)", "sd over seeds", "range", "seeds", "SDF"]


def training_rows(result: EvalResult) -> list[list[str]]:
    rows = []
    for m in result.models:
        if m.method == "PFM":
            continue
        t = m.training
        losses = t.get("epoch_losses") or []
        rows.append([m.label, f"{m.rows:,}", str(t.get("trained_rows", "?")), str(t.get("steps", "?")),
                     f"{losses[-1]:.4f}" if losses else "-", f"{t.get('seconds', 0):.1f}",
                     "yes" if t.get("cached") else "no"])
    return rows


TRAINING_HEADER = ["Model", "Rows", "Rows trained", "Steps", "Last epoch loss", "Seconds", "From cache"]


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _settings_lines(result: EvalResult) -> list[str]:
    c, p = result.config, result.pool
    t = c["training"]
    how = (f"LoRA r={t['lora_r']}, alpha={t['lora_alpha']}, dropout={t['lora_dropout']}" if t["method"] == "lora"
           else "full fine-tuning")
    return [
        f"PFM: `{c['pfm']}`",
        f"pool: `{c['pool']}`: {p['loaded']:,} rows loaded; evaluation set: {p['eval']}; "
        f"selection pool: {p['selection_pool']:,} rows",
        f"training (identical for every model): {how}, {t['epochs']} epoch(s), lr {t['lr']:g}, effective batch "
        f"{t['batch']}, max_length {t['max_length']}, template `{t['template']}`, answer-only loss",
        f"seeds: {', '.join(map(str, c['seeds']))} (training order, LoRA init and the random control's draw)",
        f"judge: {('`' + c['judge'] + '`, Vicuna/Koala pairwise prompt, both orders') if c['judge'] else 'none'}",
        f"total time: {result.seconds:.1f} s",
    ]


# --------------------------------------------------------------------------- documents


def as_json(result: EvalResult, efficiency: Any | None = None) -> dict:
    from tamis.report.efficiency_cli import efficiency_json

    spreads = M.spreads(result.points)
    return {
        "config": result.config,
        "pool": result.pool,
        "selections": {k: {kk: vv for kk, vv in v.items()} for k, v in result.selections.items()},
        "models": [{"label": m.label, "method": m.method, "seed": m.seed, "rows": m.rows, "training": m.training,
                    "heldout": m.loss, "bench": m.bench} for m in result.models],
        "comparisons": [{"a": c.a, "b": c.b, "seed": c.seed, **c.wtl.to_json(), "valid_verdicts": c.valid,
                         "verdicts": c.verdicts} for c in result.comparisons],
        "pir": {m: {g: {"pir": M.pir_by_group(result.points)[m][g], **s.to_json()} for g, s in groups.items()}
                for m, groups in spreads.items()},
        "points": [{f: getattr(p, f) for f in ("method", "sem", "counterpart", "group", "value", "selected_size",
                                                  "pool_size", "source")} for p in result.points],
        "efficiency": efficiency_json(efficiency) if efficiency is not None else None,
        "judge": result.judge,
        "notes": result.notes,
        "seconds": result.seconds,
    }


def markdown(result: EvalResult, efficiency: Any | None = None) -> str:
    from tamis.report.efficiency_cli import RANKING_HEADER, ranking_rows

    out = ["# tamis evaluate: " + ", ".join(result.config["recipes"]), ""]
    out += [f"- {line}" for line in _settings_lines(result)] + [""]
    sel = [[k, v["recipe"], f"{v['size']:,}", f"{v['sdf']:.4f}", f"{v['seconds']:.1f}"]
           for k, v in result.selections.items()]
    out += ["## Selections", "", _md_table(["Method", "Recipe", "Selected", "SDF", "Seconds"], sel), ""]
    out += ["## Held-out answer loss", "", _md_table(LOSS_HEADER, loss_rows(result)), ""]
    if result.comparisons:
        out += ["## Pairwise wins (judge: " + str(result.judge) + ")", "",
                _md_table(WINS_HEADER, wins_rows(result)), ""]
    out += ["## PIR per group (mean over seeds; Eq. 1)", "",
            _md_table(PIR_HEADER, pir_rows(result)) if result.points else "No points: nothing to place.", "",
            "`same_model_bench` is BM loss / SEM loss on the held-out answers (> 1: the selection did better); "
            "`same_model_wins` the wins-rate against BM. The points file has one row per seed and group.", ""]
    if efficiency is not None:
        mine = {p.method for p in result.points}
        rows = [r for r, m in zip(ranking_rows(efficiency), efficiency.methods) if m.method in mine or m.is_reference]
        out += ["## On the efficiency graph", "", "![evaluate](evaluate.png)", "", "![efficiency](efficiency.png)", "",
                _md_table(RANKING_HEADER, rows), "",
                "Rows: your methods and the baseline's two reference methods; `tamis efficiency points.csv` "
                "prints the whole ranking.", ""]
    out += ["## Training", "", _md_table(TRAINING_HEADER, training_rows(result)), ""]
    if result.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    return "\n".join(out)


def html_page(result: EvalResult, efficiency: Any | None, efficiency_svg: str | None) -> str:
    from tamis.report.efficiency_cli import efficiency_html_section

    parts = [f"<h1>tamis evaluate: {html.escape(', '.join(result.config['recipes']))}</h1>",
             "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in _settings_lines(result)) + "</ul>",
             '<img src="evaluate.png" alt="held-out loss and wins" style="max-width:100%">',
             "<h2>Held-out answer loss</h2>", _html_table(LOSS_HEADER, loss_rows(result))]
    if result.comparisons:
        parts += [f"<h2>Pairwise wins (judge: {html.escape(str(result.judge))})</h2>",
                  _html_table(WINS_HEADER, wins_rows(result))]
    parts += ["<h2>PIR per group</h2>", _html_table(PIR_HEADER, pir_rows(result))]
    if efficiency is not None:
        parts.append(efficiency_html_section(efficiency, efficiency_svg))
    parts += ["<h2>Training</h2>", _html_table(TRAINING_HEADER, training_rows(result))]
    if result.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in result.notes) + "</ul>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>tamis evaluate</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")


# --------------------------------------------------------------------------- figure


def plot_metrics(result: EvalResult, path: Path | str, fmt: str | None = None) -> Path:
    """Held-out loss per model (a dot per seed, a bar for the mean) and, with a judge, wins/ties/losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if result.comparisons else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.8), squeeze=False)
    ax = axes[0][0]
    by: dict[str, list[float]] = {}
    for m in result.models:
        by.setdefault(m.method, []).append(m.loss["loss"])
    names = list(by)
    means = [sum(v) / len(v) for v in by.values()]
    colours = ["#999999" if n in ("PFM", "BM") else "#1f4fbf" if not n.startswith("random") else "#e6550d" for n in names]
    ax.bar(range(len(names)), means, color=colours, alpha=0.45)
    for i, values in enumerate(by.values()):
        ax.scatter([i] * len(values), values, color="black", s=14, zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=20)
    low, high = min(min(v) for v in by.values()), max(max(v) for v in by.values())
    pad = max((high - low) * 0.3, 1e-3)
    ax.set_ylim(low - pad, high + pad)
    ax.set_ylabel("held-out answer loss (nats/token)")
    ax.set_title("held-out loss (dots: seeds)")
    if result.comparisons:
        ax = axes[0][1]
        rows = wins_rows(result)
        labels = [r[0] for r in rows]
        counts = [[int(x) for x in r[1].split(" / ")] for r in rows]
        left = [0] * len(rows)
        for k, (name, colour) in enumerate((("wins", "#2ca02c"), ("ties", "#bbbbbb"), ("losses", "#d62728"))):
            widths = [c[k] for c in counts]
            ax.barh(labels, widths, left=left, color=colour, label=name)
            left = [a + b for a, b in zip(left, widths)]
        ax.invert_yaxis()
        ax.set_xlabel("questions (all seeds)")
        ax.set_title("pairwise judge, both orders")
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format=fmt or path.suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the set


def write_reports(result: EvalResult, out_dir: Path) -> dict[str, Path]:
    """Every output of `tamis evaluate` into `out_dir`; returns them by name."""
    import tempfile

    from tamis.report.efficiency import compute_efficiency, load_points
    from tamis.report.efficiency_cli import plot_efficiency
    from tamis.runtime.outputs import write_output_set

    files = {name: out_dir / name for name in ("points.csv", "report.md", "report.html", "evaluate.png",
                                                "efficiency.png", "judgements.jsonl", "report.json")}
    points_text = M.points_csv(result.points)
    efficiency, svg = None, None
    if result.points:
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / "points.csv"
            staged.write_text(points_text, encoding="utf-8")
            # the file as `tamis efficiency` reads it: a points file it rejects fails here, not later
            efficiency = compute_efficiency(load_points([staged]))
            plot_efficiency(efficiency, Path(tmp) / "efficiency.svg")
            svg = (Path(tmp) / "efficiency.svg").read_text(encoding="utf-8")
    judgements = "".join(json.dumps({"a": c.a, "b": c.b, "seed": c.seed, **r}, ensure_ascii=False) + "\n"
                         for c in result.comparisons for r in c.records)
    writers = [
        (files["points.csv"], lambda tmp: tmp.write_text(points_text, encoding="utf-8")),
        (files["report.md"], lambda tmp: tmp.write_text(markdown(result, efficiency), encoding="utf-8")),
        (files["report.html"], lambda tmp: tmp.write_text(html_page(result, efficiency, svg), encoding="utf-8")),
        (files["evaluate.png"], lambda tmp: plot_metrics(result, tmp, fmt="png")),
    ]
    if result.comparisons:
        writers.append((files["judgements.jsonl"], lambda tmp: tmp.write_text(judgements, encoding="utf-8")))
    else:
        files.pop("judgements.jsonl")
    if efficiency is not None:
        writers.append((files["efficiency.png"], lambda tmp: _save_efficiency(efficiency, tmp)))
    else:
        files.pop("efficiency.png")
    body = as_json(result, efficiency)
    write_output_set(writers, files["report.json"], lambda digests: {**body, "outputs": digests})
    return files


def _save_efficiency(efficiency: Any, tmp: Path) -> None:
    # plot_efficiency reads the format from the suffix, which the writer's temporary name lacks
    from tamis.report.efficiency_cli import plot_efficiency

    png = tmp.with_name(tmp.name + ".png")
    plot_efficiency(efficiency, png)
    png.replace(tmp)
