"""Format-constrained replies of a local chat model: fixed text with slots, each slot filled greedily with the
choice the model itself ranks first.

A judge asked for "[1] Score: 2\\n[2] Score: 3" may answer with anything ("1. I'm ready to assist you."): a
small model often does. For a local model the reply can be held to the format instead, as grammar-guided
decoders do (llama.cpp grammars, outlines): tamis writes the fixed text ("[1] Score: ") itself, and at each
slot the model's next-token logits are read over the allowed choices ("1" … "6") only; the highest one is
written and decoding goes on. The choices are the model's own greedy preference among the allowed answers,
so a model that follows the format unaided gives the same scores as free greedy decoding.

Each choice must be one token after the text before it (digits are in every tokenizer tamis serves);
otherwise a `ModelError` names the choice. The prompt is run once; each slot feeds only the new tokens
through the KV cache (cropped where the tokenizer re-splits the text before a slot).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from tamis.errors import ModelError
from tamis.runtime.lm_scoring import cache_keyword
from tamis.runtime.models import LoadedLM
from tamis.runtime.templates import render_chat

__all__ = ["Scaffold", "constrained_replies", "slot_choice"]


@dataclass(frozen=True)
class Scaffold:
    """A reply's fixed text and slots: `texts[k]` comes before slot k, each slot takes one of `choices`."""

    texts: tuple[str, ...]
    choices: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.texts or not self.choices:
            raise ModelError("a constrained reply needs at least one slot and one choice")


def slot_choice(tokenizer: Any, before: str, choices: Sequence[str]) -> tuple[list[int], list[int]]:
    """(the reply's tokens up to the slot, each choice's token after them): the reply text before the slot
    and each choice are tokenized together, as free decoding would have written them."""
    encoded = [tokenizer(before + c, add_special_tokens=False)["input_ids"] for c in choices]
    shared = 0
    while all(shared < len(e) for e in encoded) and len({e[shared] for e in encoded}) == 1:
        shared += 1
    for c, e in zip(choices, encoded):
        if len(e) != shared + 1:
            raise ModelError(f"the tokenizer does not write the choice {c!r} as one token after {before[-20:]!r}; "
                             "a constrained reply reads each choice from one next-token logit")
    return list(encoded[0][:shared]), [e[shared] for e in encoded]


@torch.inference_mode()
def constrained_replies(lm: LoadedLM, conversations: Sequence[Sequence[Mapping[str, str]]],
                        scaffolds: Sequence[Scaffold], *, progress: bool = True,
                        desc: str = "ranking") -> list[str | None]:
    """Each conversation's reply held to its scaffold (see the module note); None where the prompt does not
    fit the model's context."""
    from tqdm.auto import tqdm

    tok = lm.tokenizer
    if not getattr(tok, "chat_template", None):
        raise ModelError(f"{lm.name} has no chat template, so it cannot serve as a judge (use an instruction-tuned "
                         "chat model)")
    context = getattr(lm.model.config, "max_position_embeddings", None) or 10**9
    out: list[str | None] = []
    for conversation, scaffold in tqdm(list(zip(conversations, scaffolds)), unit="row", desc=desc,
                                       disable=not progress):
        prompt = tok(render_chat(tok, conversation, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        out.append(_fill(lm, prompt, scaffold, context))
    return out


def _fill(lm: LoadedLM, prompt: list[int], scaffold: Scaffold, context: int) -> str | None:
    reply = ""
    fed: list[int] = []  # tokens the cache holds
    cache: Any = None
    for text in scaffold.texts:
        reply += text
        before, options = slot_choice(lm.tokenizer, reply, scaffold.choices)
        target = prompt + before
        if len(target) >= context:
            return None
        keep = _common(fed, target)
        if keep == len(target):  # the cache already ends here; re-read the last token for its logits
            keep -= 1
        if cache is not None and keep < len(fed):
            cache.crop(keep)
        past = {cache_keyword(lm.model): cache} if cache is not None else {}
        out = lm.model(input_ids=torch.tensor([target[keep:]], device=lm.device), use_cache=True, logits_to_keep=1,
                       **past)
        cache, fed = out.past_key_values, target
        logits = out.logits[0, -1].float()
        pick = int(torch.argmax(logits[torch.tensor(options, device=logits.device)]))
        reply += scaffold.choices[pick]
    return reply


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
