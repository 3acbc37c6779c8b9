"""An example tamis plug-in: two scorers, a sampler, an expression function and a judge prompt.

Load it with `--plugins examples/plugins/my_ops.py` on any tamis command:

    tamis check   --plugins examples/plugins/my_ops.py examples/plugins/relevant_spread.tamis
    tamis explain --plugins examples/plugins/my_ops.py examples/plugins/relevant_spread.tamis
    tamis run     --plugins examples/plugins/my_ops.py examples/plugins/relevant_spread.tamis --pool POOL -o out.jsonl
"""

from __future__ import annotations

import re

import numpy as np
import polars as pl

import tamis

_WORD = re.compile(r"\w+")


@tamis.scorer("relevance", model="encoder", columns={"": "float"})
def relevance(rows: pl.DataFrame, model) -> list[float]:
    """Cosine similarity of the request (instruction and input) and the answer, in the encoder's space."""
    requests = [f"{i}\n{x}" if x else i for i, x in zip(rows["instruction"], rows["input"])]
    answers = rows["output"].to_list()
    q = model.encode(requests)  # L2-normalised: a dot product is the cosine
    a = model.encode(answers)
    return np.sum(q * a, axis=1).tolist()


@tamis.scorer("repetition", params={"n": 3}, columns={"": "float", "_ngrams": "float"})
def repetition(rows: pl.DataFrame, model, n: int) -> dict:
    """Share of the answer's word n-grams that repeat an earlier one (degenerate, looping answers score high)."""
    shares, totals, reasons = [], [], []
    for text in rows["output"]:
        words = [w.lower() for w in _WORD.findall(text or "")]
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        totals.append(float(len(grams)))
        if not grams:
            shares.append(None)
            reasons.append(f"answer shorter than {n} words")
        else:
            shares.append(1 - len(set(grams)) / len(grams))
            reasons.append(None)
    return {"": shares, "_ngrams": totals, "_reason": reasons}


@tamis.sampler("length_strata", params={"strata": 4}, needs_ranked=True)
def length_strata(rows: pl.DataFrame, model, budget: int, strata: int) -> list[int]:
    """Visit rows in rank order and take them round-robin from `strata` answer-length quantiles,
    so the selection is not all long (or all short) answers."""
    lengths = rows["output"].str.len_chars().to_numpy()
    edges = np.quantile(lengths, np.linspace(0, 1, strata + 1)[1:-1]) if len(lengths) else []
    stratum = np.searchsorted(edges, lengths, side="right")
    queues = [[i for i in range(len(lengths)) if stratum[i] == s] for s in range(strata)]
    picked: list[int] = []
    while len(picked) < budget and any(queues):
        for q in queues:
            if q and len(picked) < budget:
                picked.append(q.pop(0))
    return picked


@tamis.function("sigmoid")
def sigmoid(x: pl.Expr) -> pl.Expr:
    """The logistic function, to squash a score into (0, 1) before blending."""
    return 1 / (1 + (-x).exp())


@tamis.judge_prompt(
    "helpfulness",
    system="You are a strict reviewer of answers written by an AI assistant.",
    template="Instruction:\n{instruction}\n\nInput:\n{input}\n\nAnswer:\n{output}\n\n",
    request="Rate how helpful the answer is from 1 to 10. Write the score alone on the first line, "
            "then explain.",
)
def helpfulness(first_line: str) -> float | None:
    """Accept "7", "7/10" or "Score: 7"; anything else is no score."""
    m = re.search(r"(\d+(?:\.\d+)?)\s*(?:/\s*10)?", first_line)
    return float(m.group(1)) if m else None
