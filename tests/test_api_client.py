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
