"""What `tamis explain --engine ray` adds: where each operator runs under the Ray engine, and what it
gathers to the driver. Reads only the graph and the kernel table (never imports Ray or torch)."""

from __future__ import annotations

import networkx as nx

from tamis.ops.kernel import kernel_for, node_kernel

KEY_BYTES = 40  # a row key as it travels back (32 hex characters, Arrow offsets)
VALUE_BYTES = 8  # a numeric result value


def ray_plan_lines(g: nx.DiGraph) -> list[str]:
    """One line per operator the run executes, in order: where it runs and what reaches the driver."""
    from tamis.runtime.ray_pool import NeedsDriver
    from tamis.runtime.ray_stream import stream_plan

    needed = nx.ancestors(g, g.graph["output"])
    ops = [n for n in nx.topological_sort(g) if n in needed and g.nodes[n]["kind"] == "op"]
    try:
        stream_plan(g)
    except NeedsDriver as why:
        lines = ["engine ray (the driver's path: " + str(why) + "):",
                 "  pool   loaded on the driver; the rows a Ray stage scores go to the object store as Arrow blocks "
                 "(only those the score cache lacks)"]
        lines += [f"  {n:>5}  {_where(g, n)}" for n in ops]
        lines += _probes(g, needed)
        return lines
    lines = ["engine ray (streamed: the driver never holds the pool):",
             "  pool   read by Ray Data (JSONL: read_text + the loader's Polars reader; Parquet: read_parquet), "
             "checked per batch; a pool only the driver's loader takes (bad rows, conversations, repeated ids, "
             "JSON arrays, CSV, compressed) falls back to the driver's path; gathers 8 B/row (id hashes)"]
    lines += [f"  {n:>5}  {_streamed(g, n)}" for n in ops]
    lines.append("  write  the selection and the scores written by Ray workers in order (parts joined into the "
                 "output's temporary file, renamed into place)")
    return lines


def _streamed(g: nx.DiGraph, n: str) -> str:
    a = g.nodes[n]
    op = a["op"]
    if op == "score":
        k = node_kernel(a)
        model = _model_node(g, n)
        cached = ("; the score cache looked up block by block (the driver reads the key's cached ids and values "
                  "once and ships them through the object store), each scored batch written to it by its worker"
                  if k.cached else "")
        if model is None:
            return f"Ray tasks (map_batches, {k.resources.cpus:g} CPU each); nothing gathered{cached}"
        return (_warmup_text(g, model) + f"Ray actor pool (map_batches; `{g.nodes[model]['label']}` built on the "
                f"driver for its fingerprint, then once per actor; --concurrency actors); nothing gathered{cached}")
    if op == "diverse":
        k = node_kernel(a)
        model = _model_node(g, n)
        inputs = ", ".join(c.strip("⟨⟩") + "s" for c in k.scored_inputs)
        by = f" (`{g.nodes[model]['label']}`'s actor pool, through the score cache)" if model else ""
        read = [*([inputs + " (≈ 4 B per dimension a row)"] if inputs else []),
                *(f"the {c} column" for c in k.columns_read(a["params"]) or ())]
        return ((f"{inputs} computed on Ray{by}; " if inputs else "") + "the driver gathers positions, ranking keys"
                + "".join(f", {r}" for r in read) + " of the candidates and runs the sampler; its picks go back as "
                "a top's do")
    if op == "dedup" and a["params"]["method"] == "exact":
        return ("Ray tasks hash each row's normalised text; the driver gathers positions and hashes (≈ 40 B/row), "
                "then the texts of the rows sharing a hash, and groups those by text; the removed rows leave as a "
                "where's do")
    if op == "dedup":
        model = _model_node(g, n)
        return (f"embeddings computed on Ray (`{g.nodes[model]['label']}`'s actor pool, through the score cache); the "
                "driver gathers positions, ids and embeddings (≈ 4 B per dimension a row) and finds the groups; the "
                "removed rows leave as a where's do")
    if op == "sample":
        per = a["params"].get("per")
        return (f"the driver gathers positions{' and ' + per + ' values' if per else ''} (8 B/row) in the frame's "
                "order and takes Polars' seeded sample of them; its picks go back as a top's do")
    if op == "normalize":
        column = a["params"]["column"]
        return (f"the driver gathers the {column} column (a few short strings a row), normalises it and sends it "
                "back")
    aggs = sorted({c for c in calls_of(a.get("expr")) if c in ("pct", "zscore", "minmax")})
    stats = ""
    if aggs:
        stats = "; " + ", ".join({"pct": "pct gathers its argument's values (8 B/row) and sends them back sorted",
                                  "zscore": "zscore from per-block moments (a few numbers a block)",
                                  "minmax": "minmax from per-block min/max"}[c] for c in aggs)
    if op == "rank" and not any(g.nodes[m]["op"] in ("top", "topk", "diverse") for m in nx.descendants(g, n)
                                if g.nodes[m]["kind"] == "op"):
        return ("Ray tasks (the ranking key per batch); no top after it: the whole order made on the driver from "
                f"positions and keys (16 B/row){stats}")
    if op in ("top", "topk") and a["params"].get("per") is not None:
        return ("Ray tasks (the ranking key per batch); positions, keys and group values gathered (a few bytes a "
                f"row) and the local per-group rule applied on the driver{stats}")
    if op in ("top", "topk"):
        return ("Ray tasks: each block's best rows, then a merge on the driver of positions and keys only "
                f"(≤ 16 B/row of the blocks' candidates){stats}")
    return f"Ray tasks (map_batches; Polars per batch); nothing gathered{stats}"


def _warmup_text(g: nx.DiGraph, model: str) -> str:
    """What a warmup trained on a sample of the pool gathers first (`tamis.runtime.ray_warmup`), or ""."""
    from tamis.runtime.ray_warmup import warmup_sample_node

    sample = warmup_sample_node(g, model)
    if sample is None:
        return ""
    select = g.nodes[sample]["params"]["select"]
    drawn = ("ids (≈ 40 B/row)" if select == "random" else
             "instruction embeddings and perplexities computed by an actor pool (≈ 4 B per dimension a row)")
    return (f"`{g.nodes[model]['label']}` keyed by the pool's row hashes (≈ 40 B/row gathered); unless cached, its "
            f"{select} sample drawn from positions and {drawn}, the sampled rows alone gathered whole, and it is "
            "trained on the driver; then ")


def _model_node(g: nx.DiGraph, n: str) -> str | None:
    """The model node operator `n` uses (`using M`), if any."""
    return next((p for p, _, d in g.in_edges(n, data=True) if d["flow"] == "model"), None)


def calls_of(e) -> list[str]:
    from tamis.runtime.exprs import calls_in

    return calls_in(e)


def _probes(g: nx.DiGraph, needed: set) -> list[str]:
    """Probe trainings (`train(M, on=subsets(…))`): one Ray task each."""
    out = []
    for n in sorted(needed):
        a = g.nodes[n]
        if a["kind"] == "model" and a.get("ctor") == "train" and any(
                g.nodes[p].get("source") == "subsets" for p, _, d in g.in_edges(n, data=True) if d["flow"] in ("train", "data")):
            out.append(f"  {a['label']:>5}  probes: one Ray task each (1 CPU, or 1 GPU where the cluster has GPUs; "
                       "--train-cpus), each training, evaluating and storing its probe; the driver gathers the losses")
    return out


def _where(g: nx.DiGraph, n: str) -> str:
    a = g.nodes[n]
    op = a["op"]
    k = node_kernel(a)
    if op == "score" and k is not None and k.mode == "rowwise":
        model = _model_node(g, n)
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
