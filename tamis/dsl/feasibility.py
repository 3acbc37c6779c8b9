"""The survey's feasibility indicators (Table 3, Appendix A.4), derived from a recipe's graph.

Nothing here is declared per recipe. Counting rules:
- trained LLMs: the multiplicities of trained LLM model nodes the selection depends on;
  `small_proxy` when every one of them starts from a model under 1B parameters (the survey's 1*).
- algorithm steps: building the selector (all training, and the data generation that
  feeds it) is one step; every pipeline stage is a step, except that a run of stages
  that only pick rows (where/rank/top/sample/intersect/union) is one step.
- LLM uses: steps that run an LLM over a dataset: a stage whose operator runs an LLM,
  and the build step when it generates data with an LLM.
- Rep.: the recipe names open reference code (`code "…"`); a hybrid without its own
  `code` line is reproducible when every recipe it splices is.
- Model free: nothing depends on `pfm` (a proxy of the PFM counts as the PFM).
  Dataset free: no trained model's training data derives from `pool`.
  ChatGPT/GPT-4 free: no `api(...)` model anywhere.
Ranks are dense ranks over the recipes compared (see `rank_table`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import networkx as nx

_SMALL = 1e9


@dataclass
class Feasibility:
    recipe: str
    trained_llms: int
    small_proxy: bool
    steps: int
    llm_uses: int
    reproducible: bool
    model_free: bool
    dataset_free: bool
    api_free: bool
    simplicity: int = 0
    flexibility: int = 0
    feasibility: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def trained_text(self) -> str:
        return f"{self.trained_llms}{'*' if self.small_proxy else ''}"

    @property
    def steps_text(self) -> str:
        star = "*" if self.small_proxy and self.llm_uses else ""
        return f"{self.steps}({self.llm_uses}{star})"


def _ancestry(g: nx.DiGraph) -> set[str]:
    out = g.graph["output"]
    return nx.ancestors(g, out) | {out}


def _runs_llm(g: nx.DiGraph, n: str) -> bool:
    return any(d["flow"] == "model" and g.nodes[p].get("llm") for p, _, d in g.in_edges(n, data=True))


def has_build_step(g: nx.DiGraph) -> bool:
    """Whether building the selector (training, or LLM data generation) is a step of its own."""
    nodes = _ancestry(g)
    return any(g.nodes[n]["kind"] == "model" and g.nodes[n].get("trained") for n in nodes) or \
        any(g.nodes[n]["kind"] == "dataset" and g.nodes[n].get("llm_generated") for n in nodes)


def step_numbers(g: nx.DiGraph) -> dict[str, int]:
    """Each operator's algorithm step, numbered as `feasibility` counts them: 1 is building the
    selector when there is such a step, then the stages' steps in order (a run of row-picking
    stages shares one number). `explain` prints these numbers."""
    first = 2 if has_build_step(g) else 1
    needed = _ancestry(g)
    order: dict[str, int] = {}
    for n in nx.topological_sort(g):
        if n in needed and g.nodes[n]["kind"] == "op":
            order.setdefault(g.nodes[n]["step"], first + len(order))
    return {n: order[g.nodes[n]["step"]] for n in g.nodes if g.nodes[n]["kind"] == "op" and g.nodes[n]["step"] in order}


def measure(g: nx.DiGraph) -> Feasibility:
    """Derive one recipe's indicators from its (optimised) graph."""
    nodes = _ancestry(g)
    models = [n for n in nodes if g.nodes[n]["kind"] == "model"]
    datasets = [n for n in nodes if g.nodes[n]["kind"] == "dataset"]
    ops = [n for n in nodes if g.nodes[n]["kind"] == "op"]

    trained_llm = [n for n in models if g.nodes[n].get("trained") and g.nodes[n].get("llm")]
    trained_any = [n for n in models if g.nodes[n].get("trained")]
    trained_count = sum(int(g.nodes[n].get("multiplicity", 1)) for n in trained_llm)
    small = bool(trained_llm) and all(
        g.nodes[n].get("param_count") is not None and g.nodes[n]["param_count"] < _SMALL for n in trained_llm
    )

    # The build step: every trained model and the data generation feeding it.
    build_inputs = set()
    for m in trained_any:
        build_inputs |= nx.ancestors(g, m)
    generated = [n for n in datasets if g.nodes[n].get("llm_generated")]
    build_generates = any(n in build_inputs for n in generated)
    has_build = bool(trained_any) or bool(generated)

    numbers = step_numbers(g)
    # LLM uses: each operator that runs an LLM over data (however the stages are laid out: three
    # LLM scorers in one comma-separated stage count as three, as written in three stages), plus
    # one for LLM-generated data (whether or not a model is trained on it)
    llm_ops = [n for n in ops if _runs_llm(g, n)]
    steps = len(set(numbers.values())) + (1 if has_build else 0)
    uses = len(llm_ops) + (1 if generated else 0)

    def training_data(m: str) -> list[str]:
        return [p for p, _, d in g.in_edges(m, data=True) if d["flow"] == "train"]

    # a selection of the pool (an operator's rows) derives from the pool too
    dataset_free = not any(g.nodes[d].get("derives_from_pool") or g.nodes[d]["kind"] == "op"
                           for m in trained_any for d in training_data(m))
    return Feasibility(
        recipe=g.graph.get("recipe") or g.graph.get("path") or "<recipe>",
        trained_llms=trained_count,
        small_proxy=small,
        steps=steps,
        llm_uses=uses,
        reproducible=bool(g.graph.get("reproducible")),
        model_free=not any(g.nodes[n].get("depends_on_pfm") for n in models),
        dataset_free=dataset_free,
        api_free=not any(g.nodes[n].get("api") for n in models),
    )


def _dense_rank(keys: list) -> list[int]:
    order = sorted(set(keys))
    return [order.index(k) + 1 for k in keys]


def rank_table(rows: list[Feasibility]) -> list[Feasibility]:
    """Fill in the three ranks over the recipes given, as the survey ranks them.

    Simplicity: fewer trained LLMs first (a small proxy ranks before a full LLM of the
    same count), then fewer steps, a non-reproducible method counting one step more.
    Flexibility: more ✓ first; among equal counts Model Free weighs most, then
    ChatGPT/GPT-4 Free, then Dataset Free (the survey's text lists Dataset Free second,
    but its Table 3 ranks IFD (✗✗✓) 4 above InstructionGPT-4 (✗✓✗) 5, which only that
    order reproduces). Feasibility: dense rank of simplicity + flexibility.
    """
    simp = _dense_rank([(r.trained_llms, 0 if r.small_proxy else 1, r.steps + (0 if r.reproducible else 1)) for r in rows])
    flex = _dense_rank([
        (-(r.model_free + r.dataset_free + r.api_free), -r.model_free, -r.api_free, -r.dataset_free) for r in rows
    ])
    feas = _dense_rank([s + f for s, f in zip(simp, flex)])
    for r, s, f, z in zip(rows, simp, flex, feas):
        r.simplicity, r.flexibility, r.feasibility = s, f, z
    return rows
