"""UniEval's dialogue indicators (`score unieval using encoder("…") with dimension="…"`), computed as
UniEval computes them (github.com/maszhongming/UniEval, `utils.py`, `metric/scorer.py`,
`metric/evaluator.py`; model `MingZhong/unieval-dialog`, a T5ForConditionalGeneration).

* Input text: `utils.add_question(dimension, output, src, task='dialogue')` — a Boolean question,
  then `</s> response: <output>` (and, for coherence, `</s> dialogue history: <src>`).
* `DialogEvaluator.evaluate` scores naturalness, coherence and understandability turn-level: the
  whole response is one input (only engagingness is split with `sent_tokenize` and summed; it is not
  offered here).
* `UniEvaluator.score`: `tokenizer(inputs, max_length=1024, truncation=True, padding=True)`; the
  decoder input is one token — the reference passes `labels=<first token of "No">`, which T5 shifts
  right into `[decoder_start_token_id]`, so the target's content has no effect; softmax over the
  vocabulary at that first decoder position; pos = P(`tokenizer("Yes").input_ids[0]`), neg =
  P(`tokenizer("No").input_ids[0]`); score = pos / (pos + neg), in [0, 1].
* Rows → (history, response): the history is the row's instruction, plus "\\n" + input when the
  input is non-empty, ended with "\\n\\n" (UniEval's README: turns separated by "\\n", the history
  ended by "\\n\\n", as in its topical_chat.json); the response is the row's output (null → "").

Batches here are in length order with right padding and an attention mask (the reference pads its
batches of 8 the same way); padding does not change a row's score.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


# Part of `score unieval`'s cache key: bump when the prompt, row mapping, truncation or score rule changes.
UNIEVAL_VERSION = ("1:maszhongming/UniEval utils.add_question(task=dialogue)+metric/scorer.py:"
                   "history=instruction[\\ninput]+\\n\\n:max_length=1024:yes/(yes+no)")
UNIEVAL_MAX_LENGTH = 1024
DIMENSIONS = ("naturalness", "coherence", "understandability")

_UNIEVAL_MODELS: dict[tuple[str, str], "UniEvalScorer"] = {}


def unieval_input(dimension: str, output: str, history: str | None = None) -> str:
    """The reference's input for one (response, dialogue history) — `add_question(task='dialogue')`."""
    if dimension == "naturalness":
        return "question: Is this a natural response in the dialogue? </s> response: " + output
    if dimension == "coherence":
        return ("question: Is this a coherent response given the dialogue history? </s> response: "
                + output + " </s> dialogue history: " + (history or ""))
    if dimension == "understandability":
        return "question: Is this an understandable response in the dialogue? </s> response: " + output
    raise ValueError(f"unieval dimension must be one of {', '.join(DIMENSIONS)}, not {dimension!r}")


def dialogue_history(instruction: str | None, inp: str | None) -> str:
    """A row's dialogue history in UniEval's form: turns joined by "\\n", ended by "\\n\\n"."""
    turns = [instruction or ""]
    if inp:
        turns.append(inp)
    return "\n".join(turns) + "\n\n"


def unieval_rows(rows) -> tuple[list[str], list[str]]:
    """(responses, histories) of a polars frame with instruction / input / output columns."""
    n = rows.height
    ins = rows["instruction"].to_list() if "instruction" in rows.columns else [""] * n
    inp = rows["input"].to_list() if "input" in rows.columns else [""] * n
    out = rows["output"].to_list() if "output" in rows.columns else [""] * n
    return [o or "" for o in out], [dialogue_history(a, b) for a, b in zip(ins, inp)]


@dataclass
class UniEvalScorer:
    """A UniEval T5 evaluator and its tokenizer, from one local folder."""

    path: str
    device: torch.device
    model: Any
    tokenizer: Any
    pos_id: int
    neg_id: int

    @classmethod
    def from_path(cls, path: str, device: Any = "cpu") -> "UniEvalScorer":
        """Loaded once per (folder, device) and kept for the process (a module-level cache)."""
        dev = torch.device(device)
        key = (str(Path(path).resolve()), str(dev))
        if key not in _UNIEVAL_MODELS:
            from transformers import T5ForConditionalGeneration

            from tamis.runtime.models import load_local_pretrained

            model, tok = load_local_pretrained(path, dev, T5ForConditionalGeneration, "a UniEval evaluator")
            # as the reference: the first token of "Yes" / "No"
            pos_id = int(tok("Yes")["input_ids"][0])
            neg_id = int(tok("No")["input_ids"][0])
            _UNIEVAL_MODELS[key] = cls(path, dev, model, tok, pos_id, neg_id)
        return _UNIEVAL_MODELS[key]

    def score_inputs(self, inputs: list[str], batch_size: int = 8,
                     max_length: int = UNIEVAL_MAX_LENGTH) -> list[float]:
        """pos / (pos + neg) for each prepared input text."""
        tok = self.tokenizer
        enc = [tok(t, max_length=max_length, truncation=True) for t in inputs]
        out = np.empty(len(enc), dtype=np.float64)
        if tok.pad_token is None:
            batch_size = 1
        start_id = self.model.config.decoder_start_token_id
        if start_id is None:
            start_id = self.model.config.pad_token_id
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]["input_ids"]))
        with torch.inference_mode():
            for s in range(0, len(order), max(1, int(batch_size))):
                idx = order[s:s + batch_size]
                feats = [{"input_ids": enc[i]["input_ids"], "attention_mask": enc[i]["attention_mask"]}
                         for i in idx]
                batch = tok.pad(feats, padding=True, return_tensors="pt")
                ids = batch["input_ids"].to(self.device)
                mask = batch["attention_mask"].to(self.device)
                dec = torch.full((ids.shape[0], 1), int(start_id), dtype=torch.long, device=self.device)
                logits = self.model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits[:, 0, :]
                probs = torch.softmax(logits.float(), dim=-1)
                pos, neg = probs[:, self.pos_id].double(), probs[:, self.neg_id].double()
                out[idx] = (pos / (pos + neg)).cpu().numpy()
        return out.tolist()

    def score(self, dimension: str, outputs: list[str], histories: list[str] | None = None,
              batch_size: int = 8) -> list[float]:
        """One UniEval score per response on `dimension` (naturalness, coherence, understandability)."""
        if histories is None:
            histories = [""] * len(outputs)
        inputs = [unieval_input(dimension, o, h) for o, h in zip(outputs, histories)]
        return self.score_inputs(inputs, batch_size=batch_size)
