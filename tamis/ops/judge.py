"""Judge scorers: a judge model (local chat model or endpoint) rates each row through a prompt."""

from __future__ import annotations

import polars as pl

from tamis.ops.kernel import ExecOptions, Resources, kernel


def _rating_key(params) -> dict:
    from tamis.runtime.judge_prompts import JUDGE_DECODING, JUDGE_PROMPTS

    prompt = JUDGE_PROMPTS.get(params.get("prompt"))
    # a plug-in prompt's cached ratings are keyed by its file too: editing the prompt rescores
    return {"decoding": JUDGE_DECODING, **({"prompt_version": prompt.version} if prompt and prompt.version else {})}


@kernel("scorer", "rating", cached=True, key_params=("prompt", "max_tokens"), key_extra=_rating_key,
        schema={"value": pl.Float64, "reason": pl.String, "first_line": pl.String},
        names={"value": "", "reason": "_reason", "first_line": "_said"},
        resources=Resources(device="any", memory_per_row=8 << 20))
def rating(rows, model, prompt: str, max_tokens: int, options: ExecOptions) -> dict:
    from tamis.runtime.judge import rate

    table = rate(model, rows, prompt=prompt, max_tokens=max_tokens, batch_tokens=options.batch_tokens,
                 progress=options.progress)
    return {"value": table.value, "reason": table.reason, "first_line": table.first_line}


def _tag_key(params) -> dict:
    from tamis.runtime.judge import INSTAG_REQUEST, TAG_DECODING

    return {"decoding": TAG_DECODING, "request": INSTAG_REQUEST, "parse": "instag-json-v2"}  # v2: unlisted objects are read


@kernel("scorer", "tags", cached=True, key_params=("prompt", "max_tokens"), key_extra=_tag_key,
        schema={"value": pl.List(pl.String), "reason": pl.String, "reply": pl.String},
        names={"value": "", "reason": "_reason", "reply": "_said"},
        resources=Resources(device="any", memory_per_row=8 << 20))
def tags(rows, model, prompt: str, max_tokens: int, options: ExecOptions) -> dict:
    """InsTag's tags of each row's query (instruction and input), from a local chat model or an endpoint."""
    from tamis.runtime.judge import tag

    table = tag(model, rows, max_tokens=max_tokens, batch_tokens=options.batch_tokens, progress=options.progress)
    return {"value": table.value, "reason": table.reason, "reply": table.reply}
