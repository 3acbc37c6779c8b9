"""The survey's Table 3 for a set of compiled recipes: Markdown, JSON and an HTML page with each graph drawn."""

from __future__ import annotations

import html
import io

import networkx as nx

from tamis.dsl.compile import Compiled
from tamis.dsl.feasibility import Feasibility, rank_table

JSON_KEYS = ("recipe", "trained_llms", "small_proxy", "steps", "llm_uses", "reproducible", "model_free",
             "dataset_free", "api_free", "simplicity", "flexibility", "feasibility")


def table(compiled: list[Compiled]) -> list[Feasibility]:
    return rank_table([c.feasibility() for c in compiled])


def _mark(flag: bool) -> str:
    return "✓" if flag else "✗"


def markdown(rows: list[Feasibility]) -> str:
    head = ("| Method | # Trained LLMs | # Algorithm Steps (# Using LLMs) | Rep. | Simplicity | Model Free "
            "| Dataset Free | ChatGPT/GPT-4 Free | Flexibility | Feasibility |")
    sep = "|" + "---|" * 10
    body = [
        f"| {r.recipe} | {r.trained_text} | {r.steps_text} | {_mark(r.reproducible)} | {r.simplicity} | "
        f"{_mark(r.model_free)} | {_mark(r.dataset_free)} | {_mark(r.api_free)} | {r.flexibility} | {r.feasibility} |"
        for r in rows
    ]
    note = "\n\n`*`: the trained model is a small proxy (< 1B parameters), as the survey marks GPT-2."
    return "\n".join([head, sep, *body]) + (note if any(r.small_proxy for r in rows) else "")


def as_json(rows: list[Feasibility]) -> list[dict]:
    return [{k: r.as_dict()[k] for k in JSON_KEYS} for r in rows]


_COLORS = {"model": "#9ecae1", "dataset": "#fdd49e", "op": "#c7e9c0", "output": "#fcbba1"}


def graph_svg(g: nx.DiGraph) -> str:
    """Draw a recipe graph left to right by dependency depth (matplotlib → SVG text)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # real <text>: readable at any zoom, searchable, copyable (scoped: other plots keep their settings)
    with plt.rc_context({"svg.fonttype": "none"}):
        layers = list(nx.topological_generations(g))
        pos = {}
        for x, layer in enumerate(layers):
            for y, n in enumerate(sorted(layer)):
                pos[n] = (x, -y + (len(layer) - 1) / 2)
        width = max(6.0, 2.2 * len(layers))
        height = max(2.5, 1.0 * max(len(l) for l in layers))
        fig, ax = plt.subplots(figsize=(width, height))
        nx.draw_networkx_edges(g, pos, ax=ax, arrows=True, arrowsize=10, edge_color="#777777", node_size=1800)
        for kind, color in _COLORS.items():
            nodes = [n for n in g if g.nodes[n]["kind"] == kind]
            nx.draw_networkx_nodes(g, pos, nodelist=nodes, node_color=color, node_size=1800, ax=ax,
                                   node_shape="s" if kind in ("model", "dataset") else "o")
        labels = {n: _wrap(g.nodes[n]["label"]) for n in g}
        nx.draw_networkx_labels(g, pos, labels, font_size=7, ax=ax)
        ax.set_axis_off()
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
        plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


_KINDS = {"model": "model", "dataset": "dataset", "op": "operator", "output": "selection"}


def _sources(c: Compiled) -> str:
    """The recipe's citations and reference-code links (only http(s) links are made clickable)."""
    parts = [html.escape(cite) for cite in c.recipe.cites]
    for url in c.recipe.code:
        safe = html.escape(url, quote=True)
        parts.append(f"<a href='{safe}'>{safe}</a>" if url.startswith(("https://", "http://")) else safe)
    return f"<p class='note'>{' · '.join(parts)}</p>" if parts else ""


def _wrap(label: str, width: int = 22) -> str:
    words, lines, cur = label.split(), [], ""
    for w in words:
        if cur and len(cur) + len(w) + 1 > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    lines.append(cur)
    return "\n".join(lines[:4])


def html_page(compiled: list[Compiled], rows: list[Feasibility], extra_sections: list[str] = ()) -> str:
    head = ["Method", "# Trained LLMs", "# Steps (# LLM uses)", "Rep.", "Simplicity", "Model Free", "Dataset Free",
            "ChatGPT/GPT-4 Free", "Flexibility", "Feasibility"]
    trs = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
            r.recipe, r.trained_text, r.steps_text, _mark(r.reproducible), r.simplicity, _mark(r.model_free),
            _mark(r.dataset_free), _mark(r.api_free), r.flexibility, r.feasibility)) + "</tr>"
        for r in rows
    )
    graphs = "".join(
        f"<section><h3>{html.escape(c.name)}</h3><p>{html.escape(c.recipe.title or '')}</p>{_sources(c)}"
        f"{graph_svg(c.graph)}</section>"
        for c in compiled
    )
    legend = " ".join(f"<span class='key' style='background:{color}'>{_KINDS[kind]}</span>"
                      for kind, color in _COLORS.items())
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:center}"
             "svg{max-width:100%;height:auto}.note{color:#444;font-size:90%}"
             ".key{display:inline-block;padding:2px 8px;margin-right:6px;border:1px solid #999}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>tamis feasibility</title><style>{style}</style>"
            f"</head><body><h1>Feasibility of data-selection recipes</h1>"
            f"<p>Derived from each recipe's compiled operator graph (survey Table 3, Appendix A.4).</p>"
            f"<table><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>{trs}</table>"
            "<p class='note'>Ranks are dense over the recipes shown: rank 1 is the simplest, most flexible, most "
            "feasible. <b>1*</b>: the trained LLM is a small proxy (under 1B parameters, e.g. GPT-2). "
            "# Steps (# LLM uses): algorithm steps, and how many of them run an LLM over a dataset.</p>"
            f"{''.join(extra_sections)}<h2>Recipe graphs</h2><p>{legend}; arrows show data, model and training "
            f"flow.</p>{graphs}</body></html>")
