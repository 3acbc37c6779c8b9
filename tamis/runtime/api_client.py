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

Unlike the reference, a failing endpoint is neither silent nor endless: each retry is
reported (``on_retry``; the judge shows it on its progress bar), the waits of one request
add up to at most ``max_wait`` seconds, and a few requests failing in a row stop the run
(``max_consecutive_failures``) with what was rated so far kept. Nothing the client raises
shows the key: every message goes through `redact`.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import threading
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from tamis.errors import ModelError

__all__ = ["ChatEndpoint", "JudgeBinding", "RetriesExhausted", "RetryCallback", "judge_binding", "redact"]

_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}

# on_retry(status_or_error, wait_seconds, attempt): "HTTP 503" or the network error, the
# wait about to start, and which retry follows it (1 for the first)
RetryCallback = Callable[[str, float, int], None]


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
    """POST {base_url}/chat/completions, with retries; `complete_many` keeps `concurrency` requests in flight.

    A request is retried on rate limits, server errors and timeouts, with doubling waits
    (`first_wait`, then twice that, …), at most `retries` times and at most `max_wait`
    seconds of waiting in all; `on_retry(status_or_error, wait_seconds, attempt)` hears
    about each retry before its wait. In `complete_many`, a request that runs out of
    retries goes back in the queue; `max_consecutive_failures` such failures in a row
    (no success in between) stop the run. Every message raised is redacted (`redact`).
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 6, first_wait: float = 10.0, concurrency: int = 5,
                 sleep: Callable[[float], None] | None = None, max_wait: float = 120.0,
                 max_consecutive_failures: int = 3, on_retry: RetryCallback | None = None) -> None:
        if retries < 0 or max_wait < 0 or max_consecutive_failures < 1:
            raise ModelError("ChatEndpoint needs retries >= 0, max_wait >= 0 and max_consecutive_failures >= 1")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout
        self.retries = retries
        self.first_wait = first_wait
        self.concurrency = max(1, concurrency)
        self.sleep = sleep  # None: a wait that a stopping `complete_many` cuts short
        self.max_wait = max_wait
        self.max_consecutive_failures = max_consecutive_failures
        self.on_retry = on_retry
        self.rated = 0  # requests answered over this endpoint's life (the executor calls it chunk by chunk)
        self.failures_in_a_row = 0  # kept across calls: a run of failures may span two chunks
        # name and fingerprint go into reports and messages: no key in them even if the URL carries one
        self.name = self.redact(f"{model} at {base_url}")
        self.fingerprint = self.redact(f"api:{base_url.rstrip('/')}:{model}")
        self.shown_url = self.redact(self.url)

    def redact(self, text: str) -> str:
        """`text` without this endpoint's key, $OPENAI_API_KEY or any credential-looking value."""
        return redact(text, (self.api_key, os.environ.get("OPENAI_API_KEY")))

    def complete(self, messages: Sequence[Mapping[str, str]], *, max_tokens: int, stop: Sequence[str] | None = None,
                 on_retry: RetryCallback | None = None) -> str:
        """The reply to one conversation; a ModelError (`RetriesExhausted` when retrying did not help)."""
        return self._request(self._payload(messages, max_tokens, stop), on_retry or self.on_retry, threading.Event())

    def complete_many(self, conversations: Sequence[Sequence[Mapping[str, str]]], *, max_tokens: int,
                      stop: Sequence[str] | None = None, progress: Callable[[int], None] | None = None,
                      on_retry: RetryCallback | None = None) -> list[str]:
        """Replies in input order, `concurrency` requests at a time (see the class note for failures)."""
        payloads = [self._payload(c, max_tokens, stop) for c in conversations]
        replies: list[str | None] = [None] * len(payloads)
        queue = deque(range(len(payloads)))
        stopping = threading.Event()  # set on the first fatal error: no new requests, no further retries
        pool = ThreadPoolExecutor(self.concurrency)
        in_flight: dict[Future[str], int] = {}
        try:
            while queue or in_flight:
                while queue and len(in_flight) < self.concurrency:
                    i = queue.popleft()
                    in_flight[pool.submit(self._request, payloads[i], on_retry or self.on_retry, stopping)] = i
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    i = in_flight.pop(future)
                    replies[i] = self._settle(future, queue, i)
                    if replies[i] is not None and progress:
                        progress(1)
        except BaseException:
            stopping.set()
            raise
        finally:
            # on an error, cancel what has not started and do not wait for the rest (they stop at their next retry)
            pool.shutdown(wait=not stopping.is_set(), cancel_futures=True)
        return [r or "" for r in replies]

    # ------------------------------------------------------------------ internals

    def _settle(self, future: Future[str], queue: deque[int], i: int) -> str | None:
        """The reply of a finished request; a failed one is queued again, or ends the run."""
        try:
            reply = future.result()
        except RetriesExhausted as e:
            self.failures_in_a_row += 1
            if self.failures_in_a_row >= self.max_consecutive_failures:
                raise ModelError(self._stop_message(e)) from None
            queue.append(i)  # a passing outage: try this row again after the others
            return None
        self.failures_in_a_row = 0
        self.rated += 1
        return reply

    def _stop_message(self, last: ModelError) -> str:
        return self.redact(
            f"{self.shown_url}: {self.failures_in_a_row} requests in a row failed after their retries, so the run "
            f"stops here (last: {last}). {self.rated} rows were already rated; they are kept: the executor caches "
            f"rows chunk by chunk (unless --no-cache), so running the same command again resumes after the last "
            f"finished chunk. The limits are ChatEndpoint options: retries={self.retries}, "
            f"max_wait={self.max_wait:g} (seconds of waiting per request), "
            f"max_consecutive_failures={self.max_consecutive_failures}.")

    def _payload(self, messages: Sequence[Mapping[str, str]], max_tokens: int, stop: Sequence[str] | None) -> bytes:
        body: dict[str, Any] = {"model": self.model, "messages": list(messages), "temperature": 0.0, "top_p": 1.0,
                                "max_tokens": max_tokens}
        if stop:
            body["stop"] = list(stop)
        return json.dumps(body).encode()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _request(self, data: bytes, on_retry: RetryCallback | None, stopping: threading.Event) -> str:
        """POST `data`, retrying as the class note says; stops retrying once `stopping` is set."""
        wait_next, waited = self.first_wait, 0.0
        for attempt in range(self.retries + 1):
            if stopping.is_set():
                raise _Stopped()
            try:
                return self._post(data)
            except _Retryable as e:
                failure = e
            pause = max(0.0, min(wait_next, self.max_wait - waited))  # the last wait: what the budget has left
            budget_used = wait_next > 0 and pause <= 0
            if attempt == self.retries or budget_used or stopping.is_set():
                raise RetriesExhausted(self.redact(
                    f"{self.shown_url}: {failure.detail} (after {attempt + 1} attempts and {waited:g} s of waiting)"
                )) from None
            if on_retry:
                on_retry(self.redact(failure.status), pause, attempt + 1)
            self._pause(pause, stopping)
            waited += pause
            wait_next *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    def _pause(self, seconds: float, stopping: threading.Event) -> None:
        if self.sleep is not None:
            self.sleep(seconds)
        else:
            stopping.wait(seconds)  # returns early when the run stops

    def _post(self, data: bytes) -> str:
        """One request: the reply text, `_Retryable`, or a ModelError for anything else."""
        request = urllib.request.Request(self.url, data=data, headers=self._headers(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            detail = self._snippet(_read_some(e), 300)
            if e.code in _RETRY_STATUS:
                raise _Retryable(f"HTTP {e.code}", f"HTTP {e.code}: {detail}") from None
            raise ModelError(self.redact(f"{self.shown_url}: HTTP {e.code}: {detail}")) from None
        except urllib.error.URLError as e:
            reason = str(e.reason)
            if not isinstance(e.reason, OSError):  # e.g. "unknown url type": the URL is wrong, not the network
                raise ModelError(self.redact(f"{self.shown_url}: not a usable endpoint URL: {reason}")) from None
            raise _Retryable(reason, reason) from None
        except (ValueError, http.client.InvalidURL) as e:  # a malformed URL or port: retrying cannot help
            raise ModelError(self.redact(f"{self.shown_url}: not a usable endpoint URL: {e}")) from None
        except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
            reason = str(e) or type(e).__name__
            raise _Retryable(reason, reason) from None
        return self._content(body)

    def _content(self, body: bytes) -> str:
        """choices[0].message.content of a 200 reply; anything else is a ModelError that shows the reply."""
        try:
            payload = json.loads(body.decode())
        except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
            raise ModelError(self.redact(f"{self.shown_url}: the reply is not JSON (is this an OpenAI-compatible "
                                         f"endpoint?): {self._snippet(body, 200)}")) from None
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ModelError(self.redact(f"{self.shown_url}: the reply has no choices[0].message.content: "
                                         f"{self._snippet(body, 200)}")) from None
        return "" if content is None else str(content)

    def _snippet(self, body: bytes, limit: int) -> str:
        # redact the whole body before cutting it, so a cut cannot leave half a key showing
        text = " ".join(self.redact(body.decode(errors="replace")).split())
        return text if len(text) <= limit else text[:limit] + "…"


class RetriesExhausted(ModelError):
    """A request that failed on every retry (or used up `max_wait`)."""


class _Retryable(Exception):
    """A failure worth retrying: `status` ("HTTP 503", "timed out") for a progress line,
    `detail` (with the reply's start) for the final error; neither redacted yet."""

    def __init__(self, status: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class _Stopped(Exception):
    """A request given up because its `complete_many` is stopping."""


def _read_some(error: urllib.error.HTTPError) -> bytes:
    try:
        return error.read(65536)
    except Exception:  # the body is only shown; a broken one must not hide the status
        return b""


# credentials as they show up in echoed headers, JSON, Python reprs and URLs
_CREDENTIAL_FIELD = re.compile(
    r"""(?ix)\b((?:proxy-)?authorization|x-api-key|api[-_]?key|access[-_]token)  # the field's name
    (["']?\s*[:=]\s*["']?)                                                          # : or = with quotes
    ([^\s"',;&}<>]+(?:[ \t]+[^\s"',;&}<>:=]+)?)""")                                  # value, with its scheme
_BEARER = re.compile(r"(?i)\bbearer\s+[^\s\"',;&}<>]+")
_OPENAI_STYLE_KEY = re.compile(r"\bsk-[A-Za-z0-9_-]{16,}")
_URL_USERINFO = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^/\s@]+@")
REDACTED = "[redacted]"


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with each of `secrets` and any credential-looking value replaced by "[redacted]".

    The one place that decides what a message may show: the key itself (however it was
    echoed), Authorization / api-key values, bearer tokens, sk-… keys, and user:password@
    in URLs."""
    for secret in sorted({s.strip() for s in secrets if s and s.strip()}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = _CREDENTIAL_FIELD.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
    text = _BEARER.sub("Bearer " + REDACTED, text)
    text = _OPENAI_STYLE_KEY.sub(REDACTED, text)
    return _URL_USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", text)
