"""The judge of `tamis evaluate --judge J`: a local chat model, or an OpenAI-compatible endpoint.

Both write one first line per conversation (greedy, stopped at the first newline: the verdict is read
from that line only), through the same machinery as the `rating` scorer (`tamis.runtime.judge`).
Anything with `name`, `fingerprint` and `first_lines(conversations, progress)` can judge (the tests
use a judge that always prefers the first answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

from tamis.errors import ModelError

# the first line holds two scores; the reference's 1024 tokens would only lengthen its explanation
JUDGE_MAX_TOKENS = 64


class Judge(Protocol):
    name: str
    fingerprint: str

    def first_lines(self, conversations: Sequence[Sequence[Mapping[str, str]]], progress: bool) -> list[str | None]:
        """Each conversation's reply up to its first newline; None where the prompt does not fit the judge."""
        ...


@dataclass
class LocalJudge:
    lm: Any  # LoadedLM
    max_tokens: int = JUDGE_MAX_TOKENS
    batch_tokens: int | None = None

    @property
    def name(self) -> str:
        return self.lm.name

    @property
    def fingerprint(self) -> str:
        return self.lm.fingerprint

    def first_lines(self, conversations, progress: bool) -> list[str | None]:
        from tamis.runtime.judge import first_lines

        lines, _, too_long = first_lines(self.lm, conversations, max_tokens=self.max_tokens,
                                         batch_tokens=self.batch_tokens, progress=progress)
        return [None if skipped else line for line, skipped in zip(lines, too_long)]


@dataclass
class EndpointJudge:
    endpoint: Any  # ChatEndpoint
    max_tokens: int = JUDGE_MAX_TOKENS

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def fingerprint(self) -> str:
        return self.endpoint.fingerprint

    def first_lines(self, conversations, progress: bool) -> list[str | None]:
        from tamis.runtime.judge import endpoint_first_lines  # retries shown on the bar, as for ratings

        lines, _, _ = endpoint_first_lines(self.endpoint, list(conversations), self.max_tokens, progress)
        return list(lines)


def open_judge(spec: str, *, device: str = "auto", dtype: str = "auto", cache_dir: str | None = None,
               api_base: str | None = None, model_paths: Mapping[str, str] | None = None,
               api_max_wait: float = 120.0, api_max_failures: int = 3) -> Judge:
    """`--judge`: `api:NAME` (an endpoint: --api-base or $OPENAI_BASE_URL; or a local model bound with
    --model NAME=PATH), else a local model folder, .gguf file or cached hub name."""
    from tamis.runtime.api_client import ChatEndpoint, judge_binding
    from tamis.runtime.models import load_causal_lm

    if spec.startswith("api:"):
        name = spec[len("api:"):]
        if not name:
            raise ModelError("--judge api:NAME needs the model's name, e.g. --judge api:gpt-4")
        binding = judge_binding(name, None, dict(model_paths or {}), api_base)
        if binding is None:
            raise ModelError(f"--judge {spec}: no endpoint for {name!r}; give --api-base URL (or $OPENAI_BASE_URL, "
                             f"key in $OPENAI_API_KEY), or serve it locally with --model {name}=PATH")
        if binding.local_path is not None:
            spec = binding.local_path
        else:
            assert binding.base_url is not None
            return EndpointJudge(ChatEndpoint(binding.base_url, name, max_wait=api_max_wait,
                                              max_consecutive_failures=api_max_failures))
    lm = load_causal_lm(spec, device=device, dtype=dtype, cache_root=cache_dir)
    if not getattr(lm.tokenizer, "chat_template", None):
        raise ModelError(f"--judge {spec}: the model has no chat template, so it cannot judge "
                         "(use an instruction-tuned chat model)")
    return LocalJudge(lm)
