"""What `tamis explain --engine ray` adds: where each operator runs under the Ray engine, and what it
gathers to the driver. Reads only the graph and the kernel table (never imports Ray or torch)."""

from __future__ import annotations

import networkx as nx

from tamis.ops.kernel import kernel_for, node_kernel

KEY_BYTES = 40  # a row key as it travels back (32 hex characters, Arrow offsets)
VALUE_BYTES = 8  # a numeric result value


def ray_plan_lines(g: nx.DiGraph) -> list[str]:
    """One line per operator the run executes, in order: where it runs and what reaches the driver."""
    needed = nx.ancestors(g, g.graph["output"])
    ops = [n for n in nx.topological_sort(g) if n in needed and g.nodes[n]["kind"] == "op"]
    lines = ["engine ray:",
             "  pool   loaded on the driver; the rows a Ray stage scores go to the object store as Arrow blocks "
             "(only those the score cache lacks)"]
    for n in ops:
        lines.append(f"  {n:>5}  {_where(g, n)}")
    return lines


def _where(g: nx.DiGraph, n: str) -> str:
    a = g.nodes[n]
    op = a["op"]
    k = node_kernel(a)
    if op == "score" and k is not None and k.mode == "rowwise":
        model = next((p for p, _, d in g.in_edges(n, data=True) if d["flow"] == "model"), None)
        cols = len(k.schema) or 1
        back = f"gathers ids + {cols} column(s), ≈{KEY_BYTES + VALUE_BYTES * cols} B/row"
        cached = "; workers write the score cache, one shard per batch" if k.cached else ""
        if model is None:
            return f"Ray tasks (map_batches, {k.resources.cpus:g} CPU each); {back}{cached}"
        mk = kernel_for("model", g.nodes[model]["ctor"])
        gpu = k.resources.device == "any" and (mk is None or mk.resources.device == "any")
        where = "1 GPU each where the cluster has GPUs, else CPU" if gpu else f"{k.resources.cpus:g} CPU each"
        return (f"Ray actor pool (map_batches; `{g.nodes[model]['label']}` built once per actor, {where}; "
                f"--concurrency actors); {back}{cached}")
    if op == "score":
        return "driver: a global scorer, over every row of the stage (gathered)"
    if op in ("diverse", "dedup"):
        inputs = ", ".join(k.scored_inputs) if k is not None and k.scored_inputs else ""
        return ("driver: a global operator over the candidate rows" + (f" and their {inputs}" if inputs else "")
                + (" (computed on Ray through the score cache first)" if inputs else ""))
    if op in ("rank", "top", "topk"):
        return "driver: sorts the stage's rows (ranking keys only are compared; the frame is already there)"
    return "driver: Polars over the stage's rows"
