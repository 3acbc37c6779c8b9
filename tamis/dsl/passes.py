"""Optimisation passes: pure functions graph → graph, run in order from `PASSES`.

Each pass returns a new graph and leaves its input untouched. Feasibility
metrics read `step` ids assigned at lowering, so they describe the recipe as
written whatever the passes do.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable

import networkx as nx

Pass = Callable[[nx.DiGraph], nx.DiGraph]

# Attributes that do not change what a node computes.
_NON_SEMANTIC = {"label", "recipe", "line", "column", "step", "pick", "expr"}


def _signature(g: nx.DiGraph, n: str, sigs: dict[str, str]) -> str:
    """A fixed-size digest of what `n` computes and of its inputs' digests.

    A digest, not the text: embedding each input's signature verbatim made a chain's
    keys grow (and re-escape) with every stage, so compile time doubled per stage.
    """
    attrs = {k: v for k, v in g.nodes[n].items() if k not in _NON_SEMANTIC}
    inputs = sorted((d["flow"], sigs[p]) for p, _, d in g.in_edges(n, data=True))
    text = json.dumps([attrs, inputs], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def merge_shared_subgraphs(g: nx.DiGraph) -> nx.DiGraph:
    """Hash-cons the graph: nodes computing the same thing from the same inputs become one.

    The same warmup of the same model, or the same score of the same model on the
    same rows, reached from two spliced recipes or two sub-selections, is computed once.
    """
    g = g.copy()
    sigs: dict[str, str] = {}
    seen: dict[str, str] = {}
    for n in list(nx.topological_sort(g)):
        if g.nodes[n]["kind"] == "output":
            continue
        sig = _signature(g, n, sigs)
        keep = seen.get(sig)
        if keep is None:
            seen[sig] = n
            sigs[n] = sig
            continue
        for _, succ, d in list(g.out_edges(n, data=True)):
            g.add_edge(keep, succ, **d)
        shared = g.nodes[keep].setdefault("shared_by", [])
        shared.append(g.nodes[n].get("label"))
        g.remove_node(n)
        sigs[n] = sig
    if g.graph.get("output") not in g:
        raise AssertionError("output node lost while merging")
    return g


def _data_pred(g: nx.DiGraph, n: str) -> str | None:
    return next((p for p, _, d in g.in_edges(n, data=True) if d["flow"] == "data"), None)


def _data_succs(g: nx.DiGraph, n: str) -> list[str]:
    return [s for _, s, d in g.out_edges(n, data=True) if d["flow"] == "data"]


def _swap(g: nx.DiGraph, upper: str, lower: str) -> None:
    """Swap two adjacent chain operators: pred → upper → lower → succs becomes pred → lower → upper → succs."""
    pred = _data_pred(g, upper)
    succs = _data_succs(g, lower)
    g.remove_edge(pred, upper)
    g.remove_edge(upper, lower)
    for s in succs:
        g.remove_edge(lower, s)
        g.add_edge(upper, s, flow="data")
    g.add_edge(pred, lower, flow="data")
    g.add_edge(lower, upper, flow="data")


def push_cheap_filters(g: nx.DiGraph) -> nx.DiGraph:
    """Move a row-wise `where` ahead of an expensive row-wise scorer it does not read.

    Only where that cannot change the result: both operators row-wise (the score of
    a row does not depend on other rows, the filter tests one row), the filter reads
    none of the scorer's columns, and the scorer's output feeds only this chain.
    Then the model scores fewer rows.
    """
    g = g.copy()
    changed = True
    while changed:
        changed = False
        for n in list(g.nodes):
            a = g.nodes[n]
            if a.get("op") != "where" or not a.get("rowwise"):
                continue
            up = _data_pred(g, n)
            ua = g.nodes[up]
            if ua.get("op") not in ("score", "let") or not ua.get("rowwise"):
                continue
            if ua.get("op") == "score" and ua.get("cost") != "model":
                continue
            if ua.get("op") == "let":  # only hop a let to reach a model scorer above it
                above = _data_pred(g, up)
                if g.nodes[above].get("op") != "score" or g.nodes[above].get("cost") != "model":
                    continue
            if set(a["columns_in"]) & set(ua["columns_out"]) or len(_data_succs(g, up)) != 1:
                continue
            _swap(g, up, n)
            g.nodes[n]["moved"] = f"ahead of {ua['label']}"
            changed = True
    return g


def fuse_rank_top(g: nx.DiGraph) -> nx.DiGraph:
    """`rank` followed only by `top` becomes one `topk`: a partial sort instead of a full one."""
    g = g.copy()
    for n in list(g.nodes):
        if n not in g or g.nodes[n].get("op") != "rank":
            continue
        succs = _data_succs(g, n)
        other_outs = [s for _, s, d in g.out_edges(n, data=True) if d["flow"] != "data"]
        if len(succs) != 1 or other_outs or g.nodes[succs[0]].get("op") != "top":
            continue
        if "per" in g.nodes[n]["params"] or "per" in g.nodes[succs[0]]["params"]:
            continue  # grouped: `rank … per` interleaves groups, `top … per` takes quotas; each its own path
        top = succs[0]
        r, t = g.nodes[n], g.nodes[top]
        r["op"] = "topk"
        r["label"] = f"{r['label']} | {t['label']} (fused)"
        r["params"] = {**r["params"], **t["params"]}
        for _, s, d in list(g.out_edges(top, data=True)):
            g.add_edge(n, s, **d)
        g.remove_node(top)
    return g


PASSES: list[Pass] = [merge_shared_subgraphs, push_cheap_filters, fuse_rank_top]


def optimise(g: nx.DiGraph, passes: list[Pass] = PASSES) -> nx.DiGraph:
    for p in passes:
        g = p(g)
    return g
