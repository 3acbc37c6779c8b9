"""A client for OpenAI-compatible chat endpoints (OpenAI, vLLM, llama.cpp server, …).

An `api("NAME")` model is served one of two ways (`judge_binding` decides, before any work):

* ``--model NAME=PATH`` binds it to a local chat model (`tamis.runtime.judge`);
* otherwise an endpoint: the recipe's ``api("NAME", base_url="…")``, else ``--api-base``,
  else ``$OPENAI_BASE_URL``; the key comes from ``$OPENAI_API_KEY`` (never from a recipe,
  which is meant to be shared). With neither, the run stops at plan time and says how.

Requests are what AlpaGasus' ``chatgpt_rating.py`` sends (temperature 0, top_p 1, its
max_tokens), a few at a time (it sends 5 concurrently), retried with doubling waits on
rate limits, server errors and timeouts (it waits 10 s, then 20 s, …). One addition:
``stop=["\\n"]``, because the rating is read from the first line only; the first line
is the same, and the rest of the review is not paid for.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from tamis.errors import ModelError

__all__ = ["ChatEndpoint", "JudgeBinding", "judge_binding"]

_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class JudgeBinding:
    """How an `api("NAME")` model is served: a local model folder/file, or an endpoint."""

    name: str
    local_path: str | None = None
    base_url: str | None = None


def judge_binding(name: str, recipe_base_url: str | None, model_paths: Mapping[str, str],
                  api_base: str | None = None, env: Mapping[str, str] | None = None) -> JudgeBinding | None:
    """The binding for `api(name)`, or None when nothing serves it (see the module note for the order)."""
    env = os.environ if env is None else env
    if name in model_paths:
        return JudgeBinding(name, local_path=model_paths[name])
    url = recipe_base_url or api_base or env.get("OPENAI_BASE_URL")
    return JudgeBinding(name, base_url=url.rstrip("/")) if url else None


class ChatEndpoint:
    """POST {base_url}/chat/completions, with retries; `complete_many` keeps `concurrency` requests in flight."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 6, first_wait: float = 10.0, concurrency: int = 5,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout
        self.retries = retries
        self.first_wait = first_wait
        self.concurrency = max(1, concurrency)
        self.sleep = sleep
        self.name = f"{model} at {base_url}"
        self.fingerprint = f"api:{base_url.rstrip('/')}:{model}"

    def complete(self, messages: Sequence[Mapping[str, str]], *, max_tokens: int, stop: Sequence[str] | None = None) -> str:
        body: dict[str, Any] = {"model": self.model, "messages": list(messages), "temperature": 0.0, "top_p": 1.0,
                                "max_tokens": max_tokens}
        if stop:
            body["stop"] = list(stop)
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        wait = self.first_wait
        for attempt in range(self.retries + 1):
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return _content(json.loads(response.read().decode()), self.url)
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:300]
                if e.code not in _RETRY_STATUS or attempt == self.retries:
                    raise ModelError(f"{self.url}: HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.retries:
                    raise ModelError(f"{self.url}: {getattr(e, 'reason', e)} (after {attempt + 1} attempts)") from None
            self.sleep(wait)
            wait *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    def complete_many(self, conversations: Sequence[Sequence[Mapping[str, str]]], *, max_tokens: int,
                      stop: Sequence[str] | None = None, progress: Callable[[int], None] | None = None) -> list[str]:
        def one(conv: Sequence[Mapping[str, str]]) -> str:
            text = self.complete(conv, max_tokens=max_tokens, stop=stop)
            if progress:
                progress(1)
            return text

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, conversations))


def _content(payload: Any, url: str) -> str:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ModelError(f"{url}: not a chat completion: {str(payload)[:300]}") from None
    return "" if content is None else str(content)
