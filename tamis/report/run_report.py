"""The run report written beside the selection: counts in/out per stage, score histograms, time per stage."""

from __future__ import annotations

from dataclasses import asdict


def as_dict(result, recipe: str, cfg) -> dict:
    return {
        "recipe": recipe,
        "pool": cfg.pool,
        "pool_load": result.pool_report,
        "pfm": cfg.pfm,
        "models": result.models,
        "selected_rows": result.selected.height,
        "seconds": round(result.seconds, 3),
        "stages": [asdict(s) for s in result.stages],
    }


def _bar(counts: list[int], width: int = 24) -> list[str]:
    top = max(counts) or 1
    return ["█" * max(0 if c == 0 else 1, round(c / top * width)) for c in counts]


def _fit_text(m: dict) -> str:
    """A fitted selector in one line: the linear rule written out, or the network's shape; R² on the probes."""
    r2 = f"R² = {m['r2']:.4f}" if m.get("r2") is not None else "R² undefined"
    if m["kind"] == "linear":
        terms = " ".join(f"{'−' if b < 0 else '+'} {abs(b):.4g}·{f}" for f, b in m["coefficients"].items())
        return f"{m['target']} = {m['intercept']:.4g} {terms}; {r2}"
    return f"{m['layers']} attention layer(s), {m['heads']} head(s), {m['epochs']} epochs; {r2}"


def markdown(report: dict) -> str:
    lines = [f"# tamis run: {report['recipe']}", "",
             f"- pool: `{report['pool']}` ({report['pool_load'].get('rows_loaded')} rows loaded, "
             f"{report['pool_load'].get('skipped', 0)} skipped)",
             f"- PFM: `{report['pfm']}`" if report["pfm"] else "- PFM: none given (--pfm)",
             f"- selected: {report['selected_rows']} rows",
             f"- total time: {report['seconds']:.1f} s", ""]
    if report["models"]:
        lines += ["## Models", "", "| node | model | device | dtype (why) |", "|---|---|---|---|"]
        for node, m in report["models"].items():
            if "fingerprint" in m:
                why = f" ({m['dtype_reason']})" if m.get("dtype_reason") else ""
                lines.append(f"| {node} | {m['label']} | {m['device']} | {m['dtype']}{why} |")
            elif m.get("dataset"):  # a built dataset's own account (evolve: generations, failures, labels)
                lines.append(f"| {node} | {m['label']}: {m['summary']} ({m['generated_now']} generated now, "
                             f"{m['seconds']} s) | | |")
            elif "losses" in m:  # probes: n models, each labelled by its evaluation loss
                per = f", {m['seconds_per_probe']} s per probe trained now" if m.get("seconds_per_probe") else ""
                scored = m.get("eval_rows_scored", [m["eval_rows"]])
                fewest, most = m["eval_rows"] - max(scored), m["eval_rows"] - min(scored)
                unscored = (f", {fewest if fewest == most else f'{fewest}–{most}'} of them with no scorable answer "
                            "(empty, or cut off by max_length), left out of the mean" if most else "")
                lines.append(f"| {node} | probes: {m['probes']} ({m['cached']} from cache), {m['rows_per_probe']} rows "
                             f"each, loss on {m['evaluation']} ({m['eval_rows']} rows{unscored}){per} | | |")
            elif m.get("kind") in ("linear", "selfattn"):
                lines.append(f"| {node} | fit({m['kind']}) on {m['probes']} probes: {_fit_text(m)} | | |")
            else:
                lines.append(f"| {node} | training: {m.get('rows')} rows, {m.get('method')}, "
                             f"{'from cache' if m.get('cached') else 'trained now'} | | |")
        lines.append("")
        lines += [f"- `{node}`: {m['note']}" for node, m in report["models"].items() if m.get("note")]
    engines = any("engine" in s for s in report["stages"])  # --engine ray: where each stage ran
    lines += ["## Stages", "", "| stage | rows in | rows out | seconds (model setup) | computed now | from cache | "
              "no score (reason: rows) |" + (" ran on |" if engines else ""),
              "|---|---|---|---|---|---|---|" + ("---|" if engines else "")]
    for s in report["stages"]:
        skipped = ", ".join(f"{k}: {v}" for k, v in s["skipped"].items()) or ""
        setup = f" ({s['model_seconds']:.1f})" if s["model_seconds"] else ""
        torn = s.get("torn_rows", 0)  # rows a killed run had cached in a cut-off journal chunk: computed again
        again = f" ({torn} again: torn cache journal)" if torn > 0 else " (a torn cache journal's chunk again)" if torn else ""
        lines.append(f"| `{s['label']}` | {s['rows_in']} | {s['rows_out']} | {s['seconds']:.2f}{setup} | {s['scored_rows']}"
                     f"{again} | {s['cached_rows']} | {skipped} |" + (f" {s.get('engine', '')} |" if engines else ""))
    notes = [(s["label"], n) for s in report["stages"] for n in s.get("notes", [])]
    if notes:
        lines += ["", "## Notes", ""] + [f"- `{label}`: {n}" for label, n in notes]
    for s in report["stages"]:
        if s.get("removed"):  # dedup: what it removed, and why
            lines += ["", f"### `{s['label']}`: removed rows (first {len(s['removed'])})", "",
                      "| id | duplicate of | similarity | method |", "|---|---|---|---|"]
            for r in s["removed"]:
                sim = r.get("similarity")
                lines.append(f"| {r['id']} | {r['duplicate_of']} | {'' if sim is None else f'{sim:.3f}'} | {r['method']} |")
    for s in report["stages"]:
        h = s.get("histogram")
        if not h:
            continue
        lines += ["", f"### `{s['label']}`: distribution (n={h['n']}, nulls={h['nulls']}, mean={h['mean']:.4g})", "", "```"]
        for lo, hi, c, bar in zip(h["edges"], h["edges"][1:], h["counts"], _bar(h["counts"])):
            lines.append(f"{lo:>10.4g} – {hi:<10.4g} {c:>6} {bar}")
        lines.append("```")
    return "\n".join(lines) + "\n"
