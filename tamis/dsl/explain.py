"""Readable renderings of a compiled graph: a plan (like EXPLAIN), node-link JSON, Graphviz DOT."""

from __future__ import annotations

import json

import networkx as nx

from tamis.dsl import ast
from tamis.ops.kernel import node_kernel


def _chain(g: nx.DiGraph, end: str) -> list[str]:
    """The data chain leading to `end`, first operator first."""
    out = []
    n = end
    while True:
        pred = next((p for p, _, d in g.in_edges(n, data=True) if d["flow"] == "data"), None)
        if pred is None or g.nodes[pred]["kind"] != "op":
            break
        out.append(pred)
        n = pred
    return out[::-1]


def _inputs(g: nx.DiGraph, n: str, flows: set[str]) -> list[str]:
    return [p for p, _, d in g.in_edges(n, data=True) if d["flow"] in flows]


def plan_text(g: nx.DiGraph, engine: str = "local") -> str:
    lines = [f"recipe {g.graph.get('recipe') or '<unnamed>'}" + (f" — {g.graph['title']}" if g.graph.get("title") else "")]
    models = [n for n in nx.topological_sort(g) if g.nodes[n]["kind"] == "model"]
    datasets = [n for n in nx.topological_sort(g) if g.nodes[n]["kind"] == "dataset" and n != "data:pool"]
    if models:
        from tamis.dsl.feasibility import has_build_step

        lines.append("models:" + ("  [step 1: build the selector]" if has_build_step(g) else ""))
        for m in models:
            a = g.nodes[m]
            tags = [t for t, on in (("LLM", a.get("llm")), ("API", a.get("api")), ("trained", a.get("trained")),
                                     ("depends on PFM", a.get("depends_on_pfm"))) if on]
            if a.get("param_count"):
                tags.append(f"{a['param_count'] / 1e9:.3g}B params")
            src = [g.nodes[p]["label"] for p in _inputs(g, m, {"train"})]
            evaluated = [g.nodes[p]["label"] for p in _inputs(g, m, {"eval"})]  # probes' evaluation set
            lines.append(f"  {m:>5}  {a['label']}" + (f"  on {', '.join(src)}" if src else "")
                         + (f"  evaluated on {', '.join(evaluated)}" if evaluated else "")
                         + (f"  [{', '.join(tags)}]" if tags else ""))
    if datasets:
        lines.append("datasets:")
        for d in datasets:
            a = g.nodes[d]
            tags = [t for t, on in (("from pool", a.get("derives_from_pool")), ("LLM-generated", a.get("llm_generated"))) if on]
            if a.get("multiplicity", 1) > 1:
                tags.append(f"×{a['multiplicity']}")
            lines.append(f"  {d:>5}  {a['label']}" + (f"  [{', '.join(tags)}]" if tags else ""))
    if g.graph.get("uses"):
        lines.append("uses:")
        for u in g.graph["uses"]:
            note = "  (a local file shadows the built-in recipe)" if u.get("shadows_builtin") else ""
            lines.append(f"  line {u['line']}: use {u['recipe']} → {u['path']}{note}")
    selections = [n for n in g.nodes if any(d["flow"] == "selection" for _, _, d in g.out_edges(n, data=True))]
    for s in selections:
        lines.append(f"selection ending at {s}:")
        lines += _plan_chain(g, _chain(g, s) + [s])
    lines.append("pipeline (pool →):")
    lines += _plan_chain(g, _chain(g, g.graph["output"]))
    lines.append("  → selection")
    if engine == "ray":  # where each operator runs on Ray, and what it gathers to the driver
        from tamis.runtime.ray_plan import ray_plan_lines

        lines += ray_plan_lines(g)
    return "\n".join(lines)


def _plan_chain(g: nx.DiGraph, chain: list[str]) -> list[str]:
    from tamis.dsl.feasibility import step_numbers

    steps = step_numbers(g)
    out = []
    for n in chain:
        a = g.nodes[n]
        notes = []
        if a.get("columns_out"):
            notes.append("+" + ", ".join(a["columns_out"]))
        if a.get("cost") == "model":
            notes.append("model")
        if a.get("moved"):
            notes.append(f"moved {a['moved']}")
        if a.get("shared_by"):
            notes.append(f"shared ×{len(a['shared_by']) + 1}")
        step = f"step {steps[n]}" if n in steps else "unused"
        out.append(f"  {n:>5}  [{step}] {a['label']}" + (f"   ({'; '.join(notes)})" if notes else ""))
        k = node_kernel(a)
        if k is not None:
            out.append(f"         kernel {k.source}:{getattr(k.fn, '__name__', k.name)}  "
                       f"[{'row-wise' if k.mode == 'rowwise' else 'global'}{', cached' if k.cached else ''}, "
                       f"{k.resources.describe()}]")
        elif a["kind"] == "op" and a["op"] in ("score", "diverse"):
            out.append("         kernel: none yet (cannot run locally)")
    return out


def _plain(v):
    if isinstance(v, ast.Node):
        return v.unparse() if isinstance(v, ast.Expr) else v.model_dump()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def graph_json(g: nx.DiGraph) -> dict:
    data = nx.node_link_data(g, edges="edges")
    data["nodes"] = [{k: _plain(v) for k, v in n.items()} for n in data["nodes"]]
    for node in data["nodes"]:  # each operator's kernel and resources (null: none yet)
        if node.get("kind") == "op" and node.get("op") in ("score", "diverse"):
            k = node_kernel(node)
            node["kernel"] = k.describe() if k else None
    data["graph"] = _plain(dict(data["graph"]))
    return data


def graph_dot(g: nx.DiGraph) -> str:
    shapes = {"model": "box", "dataset": "cylinder", "op": "ellipse", "output": "doublecircle"}
    colors = {"data": "black", "model": "blue", "train": "darkgreen", "base": "gray40", "labels": "purple", "eval": "orange",
              "side": "orange", "selection": "red"}
    lines = ["digraph recipe {", "  rankdir=LR;", '  node [fontname="Helvetica", fontsize=10];']
    for n, a in g.nodes(data=True):
        label = json.dumps(a["label"])
        lines.append(f"  {json.dumps(n)} [label={label}, shape={shapes[a['kind']]}];")
    for u, v, d in g.edges(data=True):
        lines.append(f"  {json.dumps(u)} -> {json.dumps(v)} [color={colors.get(d['flow'], 'black')}, label={json.dumps(d['flow'] if d['flow'] != 'data' else '')}];")
    lines.append("}")
    return "\n".join(lines)
