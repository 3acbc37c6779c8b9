"""api("NAME") models over an OpenAI-compatible endpoint.

The endpoint is a real HTTP server on localhost that answers /v1/chat/completions with
the tiny trained judge (transformers' own greedy `generate`, cut at the request's stop
strings), so the client, its requests and its retries are tested over the wire.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import polars as pl
import pytest
from conftest import POOL_SMALL, judge_reply
from typer.testing import CliRunner

from tamis.cli import app
from tamis.errors import ModelError
from tamis.runtime.api_client import ChatEndpoint, judge_binding
from tamis.runtime.judge import rate

ROWS = [json.loads(line) for line in POOL_SMALL.read_text().splitlines()]


class _Server:
    """A chat-completions endpoint serving a local model; `fail_first` answers the first
    N requests with that HTTP status; `requests` records every body received."""

    def __init__(self, model_dir: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.fail_first: list[int] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    status = server.fail_first.pop(0) if server.fail_first else 200
                    text = server.reply(body) if status == 200 else ""
                payload = ({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
                           if status == 200 else {"error": {"message": "try later"}})
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def reply(self, body: dict) -> str:
        import torch

        enc = self.tok.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=body["max_tokens"], do_sample=False,
                                      pad_token_id=self.tok.eos_token_id)
        text = self.tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for stop in body.get("stop") or []:
            text = text.split(stop)[0]
        return text


@pytest.fixture(scope="module")
def server(tiny_judge):
    s = _Server(tiny_judge)
    yield s
    s.httpd.shutdown()


def test_ratings_over_the_wire_and_what_is_sent(server):
    server.requests.clear()
    table = rate(ChatEndpoint(server.url, "gpt-3.5-turbo", api_key="sk-test"), ROWS, progress=False)
    assert table.value == [judge_reply(i)[1] for i in range(len(ROWS))]
    assert table.first_line == [judge_reply(i)[0].split("\n")[0] for i in range(len(ROWS))]
    body = server.requests[0]
    assert (body["model"], body["temperature"], body["top_p"], body["max_tokens"], body["stop"]) == \
        ("gpt-3.5-turbo", 0.0, 1.0, 256, ["\n"])
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert server.headers[0]["Authorization"] == "Bearer sk-test"


def test_rate_limits_are_retried_with_doubling_waits(server):
    waits: list[float] = []
    server.fail_first[:] = [429, 503]
    endpoint = ChatEndpoint(server.url, "j", sleep=waits.append, concurrency=1)
    assert endpoint.complete([{"role": "user", "content": "hi"}], max_tokens=4) is not None
    assert waits == [10.0, 20.0]


def test_a_refused_request_is_a_clear_error(server):
    server.fail_first[:] = [401]
    with pytest.raises(ModelError, match="HTTP 401"):
        ChatEndpoint(server.url, "j", sleep=lambda s: None).complete([{"role": "user", "content": "hi"}], max_tokens=4)


def test_an_unreachable_endpoint_is_a_clear_error():
    endpoint = ChatEndpoint("http://127.0.0.1:9/v1", "j", retries=1, sleep=lambda s: None, timeout=2)
    with pytest.raises(ModelError, match="after 2 attempts"):
        endpoint.complete([{"role": "user", "content": "hi"}], max_tokens=4)


def test_binding_order_local_then_recipe_then_flag_then_environment():
    env = {"OPENAI_BASE_URL": "http://env/v1"}
    assert judge_binding("g", "http://recipe/v1", {"g": "/m"}, "http://flag/v1", env).local_path == "/m"
    assert judge_binding("g", "http://recipe/v1", {}, "http://flag/v1", env).base_url == "http://recipe/v1"
    assert judge_binding("g", None, {}, "http://flag/v1/", env).base_url == "http://flag/v1"
    assert judge_binding("g", None, {}, None, env).base_url == "http://env/v1"
    assert judge_binding("g", None, {}, None, {}) is None


def test_alpagasus_through_the_cli_with_api_base(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    server.headers.clear()
    out = tmp_path / "picked.jsonl"
    res = CliRunner().invoke(app, ["run", "alpagasus", "--pool", str(POOL_SMALL), "--api-base", server.url,
                                   "-o", str(out), "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert pl.read_ndjson(out)["id"].to_list() == ["row-0", "row-2", "row-4", "row-6"]
    assert server.headers and all(h["Authorization"] == "Bearer sk-env" for h in server.headers)
    report = json.loads((tmp_path / "picked.report.json").read_text())
    assert "remote" in json.dumps(report)


def test_without_any_binding_the_run_stops_before_work(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    res = CliRunner().invoke(app, ["run", "alpagasus", "--pool", str(POOL_SMALL), "-o", str(tmp_path / "x.jsonl")])
    assert res.exit_code == 1
    assert "--model gpt-3.5-turbo=PATH" in res.output and "--api-base URL" in res.output
    assert not (tmp_path / "x.jsonl").exists()


def test_a_malformed_model_option_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(app, ["run", "alpagasus", "--pool", str(POOL_SMALL), "-o", str(tmp_path / "x.jsonl"),
                                   "--model", "gpt-3.5-turbo"])
    assert res.exit_code == 2 and "NAME=VALUE" in res.output


# --------------------------------------------------------------------------- failing endpoints
# A scripted endpoint (no model): each request takes the next entry of `script` — an HTTP
# status, or (status, body, content type) — and once the script is used up, `then`.
# A 200 status answers with the request's last message, so replies can be told apart;
# another status answers with an error body that echoes the request's headers, the way
# some proxies do.

KEY = "my-secret-key-1234"  # not sk-… shaped: only the exact-value redaction can catch it


class _Scripted:
    def __init__(self) -> None:
        self.script: list = []
        self.then: object = 200
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    entry = server.script.pop(0) if server.script else server.then
                status, data, kind = entry if isinstance(entry, tuple) else (entry, None, "application/json")
                if data is None and status == 200:
                    data = json.dumps({"choices": [{"message": {"content": body["messages"][-1]["content"]}}]})
                elif data is None:
                    data = json.dumps({"error": "bad request", "headers": dict(self.headers)}) + "\n" + \
                        str(self.headers) + f"\nkey={KEY}"
                raw = data.encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def scripted():
    s = _Scripted()
    yield s
    s.httpd.shutdown()


def _hi(text: str = "hi") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("status", [400, 500])
def test_error_bodies_that_echo_the_headers_do_not_show_the_key(scripted, monkeypatch, status):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    scripted.then = status
    waits: list[float] = []
    endpoint = ChatEndpoint(scripted.url, "j", retries=2, sleep=waits.append)
    with pytest.raises(ModelError) as caught:
        endpoint.complete(_hi(), max_tokens=4)
    text = str(caught.value)
    assert f"HTTP {status}" in text and "[redacted]" in text and scripted.url in text
    assert KEY not in text and "Bearer my" not in text
    assert waits == ([] if status == 400 else [10.0, 20.0])  # 400 is not retried


def test_the_redaction_helper_covers_headers_bearers_keys_and_urls():
    from tamis.runtime.api_client import redact

    text = redact("Authorization: Bearer abc.def\r\napi-key: k1 {'x-api-key': 'k2'} "
                  "https://u:pw@h/v1?api_key=k3&v=1 bearer k4 sk-abcdefghijklmnopqrstuv plain k5!", ["k5!", None])
    for secret in ["abc.def", "k1", "k2", "k3", "k4", "k5!", "u:pw", "sk-abcdef"]:
        assert secret not in text
    assert "Authorization: [redacted]" in text and "Bearer [redacted]" in text and "v=1" in text


def test_names_and_unreachable_errors_are_redacted(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    endpoint = ChatEndpoint(f"http://127.0.0.1:9/{KEY}/v1", "j", retries=0, timeout=2)
    assert KEY not in endpoint.name + endpoint.fingerprint
    with pytest.raises(ModelError, match=r"after 1 attempts") as caught:
        endpoint.complete(_hi(), max_tokens=4)
    assert KEY not in str(caught.value) and "[redacted]" in str(caught.value)


@pytest.mark.parametrize("body, kind, what", [
    ("<html><body>Welcome! Authorization: Bearer " + KEY + "</body></html>" + "x" * 500, "text/html", "not JSON"),
    ('{"data": []}', "application/json", "no choices"),
    ('{"choices": []}', "application/json", "no choices"),
    ('{"choices": [{"message": {}}]}', "application/json", "no choices"),
    ('{"choices": "x"}', "application/json", "no choices"),
    ("\xff\xfe", "application/octet-stream", "not JSON"),
])
def test_a_reply_that_is_not_a_chat_completion_is_a_clear_error(scripted, monkeypatch, body, kind, what):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    scripted.script[:] = [(200, body, kind)]
    with pytest.raises(ModelError) as caught:
        ChatEndpoint(scripted.url, "j", sleep=lambda s: None).complete(_hi(), max_tokens=4)
    text = str(caught.value)
    assert what in text and f"{scripted.url}/chat/completions" in text
    assert KEY not in text and caught.value.__cause__ is None and caught.value.__suppress_context__
    assert len(text) < len(scripted.url) + 300  # the reply's start, not all of it
    assert len(scripted.requests) == 1  # not retried: it will not get better


def test_a_malformed_url_is_a_clear_error_without_retries():
    waits: list[float] = []
    for url in ["localhost:8000/v1", "http://127.0.0.1:port/v1"]:
        with pytest.raises(ModelError, match="not a usable endpoint URL"):
            ChatEndpoint(url, "j", sleep=waits.append).complete(_hi(), max_tokens=4)
    assert waits == []


def test_each_retry_is_reported_before_its_wait(scripted):
    scripted.script[:] = [503, 503, 429]
    waits: list[float] = []
    calls: list[tuple[str, float, int]] = []
    endpoint = ChatEndpoint(scripted.url, "j", sleep=waits.append, max_wait=1000,
                            on_retry=lambda *a: calls.append(a))
    assert endpoint.complete(_hi("ok"), max_tokens=4) == "ok"
    assert waits == [10.0, 20.0, 40.0]
    assert calls == [("HTTP 503", 10.0, 1), ("HTTP 503", 20.0, 2), ("HTTP 429", 40.0, 3)]


def test_the_waits_of_one_request_are_capped(scripted):
    scripted.then = 503
    waits: list[float] = []
    calls: list[tuple[str, float, int]] = []
    endpoint = ChatEndpoint(scripted.url, "j", retries=6, sleep=waits.append, max_wait=45,
                            on_retry=lambda *a: calls.append(a))
    with pytest.raises(ModelError, match=r"HTTP 503.*after 4 attempts and 45 s of waiting"):
        endpoint.complete(_hi(), max_tokens=4)
    assert waits == [10.0, 20.0, 15.0] and [c[1] for c in calls] == waits  # the last wait is cut short
    waits.clear()
    with pytest.raises(ModelError, match="after 5 attempts and 120 s"):
        ChatEndpoint(scripted.url, "j", sleep=waits.append).complete(_hi(), max_tokens=4)
    assert waits == [10.0, 20.0, 40.0, 50.0] and sum(waits) == 120.0  # the default cap, 120 s


def test_a_failed_request_is_tried_again_after_the_others(scripted):
    scripted.script[:] = [200, 503, 200]
    done: list[int] = []
    endpoint = ChatEndpoint(scripted.url, "j", retries=0, concurrency=1, sleep=lambda s: None)
    replies = endpoint.complete_many([_hi(f"r{i}") for i in range(3)], max_tokens=4, progress=done.append)
    assert replies == ["r0", "r1", "r2"] and sum(done) == 3
    assert [r["messages"][-1]["content"] for r in scripted.requests] == ["r0", "r1", "r2", "r1"]


def test_consecutive_failures_stop_the_run_and_say_what_is_kept(scripted):
    # r0, r1 rated; r2 fails; r3 rated (the run of failures starts again); r4, r5, r6 fail: stop
    scripted.script[:] = [200, 200, 503, 503, 200]
    scripted.then = 503
    waits: list[float] = []
    endpoint = ChatEndpoint(scripted.url, "j", retries=1, concurrency=1, sleep=waits.append)
    with pytest.raises(ModelError) as caught:
        endpoint.complete_many([_hi(f"r{i}") for i in range(20)], max_tokens=4)
    text = str(caught.value)
    assert "3 requests in a row failed" in text and "3 rows were already rated" in text and "kept" in text
    assert "retries=1" in text and "max_wait=120" in text and "max_consecutive_failures=3" in text
    sent = [r["messages"][-1]["content"] for r in scripted.requests]
    assert sent == ["r0", "r1", "r2", "r2", "r3", "r4", "r4", "r5", "r5", "r6", "r6"]  # no request after the stop
    assert waits == [10.0] * 4


def test_a_stopped_run_launches_no_new_requests(scripted):
    scripted.then = 503
    endpoint = ChatEndpoint(scripted.url, "j", retries=0, concurrency=3, sleep=lambda s: None,
                            max_consecutive_failures=2)
    with pytest.raises(ModelError, match="2 requests in a row"):
        endpoint.complete_many([_hi(f"r{i}") for i in range(50)], max_tokens=4)
    import time

    time.sleep(0.3)  # anything still launched would have arrived by now
    assert len(scripted.requests) <= 3 + 1  # the first three, and at most one sent again after the first failure


def test_a_refused_request_stops_complete_many_at_once(scripted):
    scripted.script[:] = [401]
    endpoint = ChatEndpoint(scripted.url, "j", concurrency=1, sleep=lambda s: None)
    with pytest.raises(ModelError, match="HTTP 401"):
        endpoint.complete_many([_hi(f"r{i}") for i in range(20)], max_tokens=4)
    assert len(scripted.requests) == 1


def test_the_judge_shows_each_retry(scripted, capsys):
    scripted.script[:] = [503]
    endpoint = ChatEndpoint(scripted.url, "j", concurrency=1, sleep=lambda s: None)
    rate(endpoint, ROWS[:2], progress=False)  # no bar: a line on stderr
    assert "HTTP 503, retry 1 in 10 s" in capsys.readouterr().err
    scripted.script[:] = [503, 502]
    rate(endpoint, ROWS[:2], progress=True)  # a bar: its postfix
    err = capsys.readouterr().err
    assert "HTTP 503, retry 1 in 10 s" in err and "HTTP 502, retry 2 in 20 s" in err
