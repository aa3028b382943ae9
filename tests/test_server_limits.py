"""Issue 18 on a real server: every limit answered with a named error in its API's envelope (413, 400, 429 with
Retry-After, 504), the event loop free while a request is prepared, unsatisfiable schemas rejected, `required`
always a call, the Allow header, the OpenAPI error documentation, and API keys."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from server_fixtures import API_KEY, MODEL, ServerThread, make_model_dir, make_state

from kimi_k2.server.state import ServerLimits, ServerState

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ASK = [{"role": "user", "content": "hi"}]
CHAT = {"model": MODEL, "messages": ASK, "max_tokens": 4}
MSG = {"model": MODEL, "messages": ASK, "max_tokens": 4}
LIMITS = ServerLimits(max_request_bytes=64 << 10, max_stop_sequences=4, max_stop_chars=50, max_tools=3,
                      max_schema_bytes=4096, max_queued_requests=2)
CYCLE = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
NEEDS_CHILD = {"type": "object", "properties": {"child": {"$ref": "#"}}, "required": ["child"]}


@pytest.fixture(scope="module")
def model_dir(k2_tokenizer_dir, tmp_path_factory):
    return make_model_dir(k2_tokenizer_dir, tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def served(model_dir):
    state = make_state(model_dir, limits=LIMITS)
    with ServerThread(state) as url:
        yield url, state


def openai_error(r: httpx.Response, status: int, kind: str, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == kind and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err["message"]


def anthropic_error(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"], body
    return body["error"]["message"]


class Gate:
    """Holds every chat-template rendering whose conversation mentions BLOCK until opened (a slow preparation)."""

    def __init__(self, state: ServerState, monkeypatch):
        self.open, self.entered = threading.Event(), threading.Event()
        real = state.tokenizer.apply_chat_template

        def render(messages, *a, **kw):
            if "BLOCK" in json.dumps(messages):
                self.entered.set()
                assert self.open.wait(60)
            return real(messages, *a, **kw)

        monkeypatch.setattr(state.tokenizer, "apply_chat_template", render)

    def post(self, url: str, path: str, body: dict, out: list) -> threading.Thread:
        t = threading.Thread(target=lambda: out.append(httpx.post(url + path, json=body, headers=AUTH, timeout=60)))
        t.start()
        return t


def test_body_over_the_limit_is_413_before_reading(served):
    url, _ = served
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (70 << 10)}]}
    r = httpx.post(url + "/v1/chat/completions", json=big, headers=AUTH)
    assert "65536 bytes" in openai_error(r, 413, "invalid_request_error")
    assert r.json()["error"]["code"] == "request_too_large"
    anthropic_error(httpx.post(url + "/v1/messages", json={**MSG, **big, "max_tokens": 4}, headers=AUTH), 413,
                    "request_too_large")

    def chunks():  # no Content-Length: counted while it arrives
        yield b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
        for _ in range(80):
            yield b"y" * 1024
        yield b'"}]}'

    r = httpx.post(url + "/v1/chat/completions", content=chunks(),
                   headers={**AUTH, "content-type": "application/json"})
    openai_error(r, 413, "invalid_request_error")


def test_health_answers_while_a_request_is_prepared(served, monkeypatch):
    """Chat rendering / tokenization / count_tokens run on the preparation threads: with two held there, /health
    and other routes are answered at once (issue 18: a 25 MB body stalled /health for 6.5 s)."""
    url, state = served
    gate = Gate(state, monkeypatch)
    out: list = []
    blocked = ASK + [{"role": "user", "content": "BLOCK"}]
    threads = [gate.post(url, "/v1/chat/completions", {**CHAT, "messages": blocked}, out)]
    assert gate.entered.wait(30)
    threads.append(gate.post(url, "/v1/messages/count_tokens", {**MSG, "messages": blocked}, out))
    try:
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        assert httpx.get(url + "/v1/models", headers=AUTH, timeout=10).status_code == 200
    finally:
        gate.open.set()
        for t in threads:
            t.join(60)
    assert sorted(r.status_code for r in out) == [200, 200]


def test_full_queue_is_429_with_retry_after(served, monkeypatch):
    url, state = served
    gate = Gate(state, monkeypatch)
    out: list = []
    blocked = {**CHAT, "messages": [{"role": "user", "content": "BLOCK"}]}
    threads = [gate.post(url, "/v1/chat/completions", blocked, out) for _ in range(2)]
    deadline = time.monotonic() + 30
    while state.admission.queued < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        r = httpx.post(url + "/v1/chat/completions", json=CHAT, headers=AUTH)
        assert "2 requests are already queued" in openai_error(r, 429, "rate_limit_error")
        assert r.headers["retry-after"] == "1"
        r = httpx.post(url + "/v1/messages", json=MSG, headers=AUTH)
        anthropic_error(r, 429, "rate_limit_error")
        assert r.headers["retry-after"] == "1"
    finally:
        gate.open.set()
        for t in threads:
            t.join(60)
    assert [r.status_code for r in out] == [200, 200] and state.admission.queued == 0


def test_prompt_proven_too_long_is_400_before_tokenizing(served, monkeypatch):
    url, state = served
    seen: list[int] = []
    real = state.tokenizer.encode
    monkeypatch.setattr(state.tokenizer, "encode", lambda text, *a, **kw: seen.append(len(text)) or real(text, *a,
                                                                                                        **kw))
    n = (state.max_prompt_tokens + 1) * state.max_token_chars
    long = "z" * n
    r = httpx.post(url + "/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": long}]},
                   headers=AUTH)
    assert "at least" in openai_error(r, 400, "invalid_request_error", "messages")
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": long}, headers=AUTH)
    assert "at least" in openai_error(r, 400, "invalid_request_error", "prompt")
    assert not any(k >= n for k in seen)


@pytest.mark.parametrize("body, param, needle", [
    ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({**CHAT, "stop": "q" * 51}, "stop", "at most 50"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(4)]}, None, "at most 3"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "description": "d" * 5000}}}]}, None, "4096 bytes"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": CYCLE}}}, None,
     "response_format.json_schema.schema cannot be satisfied"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": CYCLE}}],
      "tool_choice": "required"}, None, "tools[0] (f) schema cannot be satisfied"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": NEEDS_CHILD}}}, None,
     "finite JSON value"),
])
def test_openai_limits_and_unsatisfiable_schemas(served, body, param, needle):
    r = httpx.post(url_of(served) + "/v1/chat/completions", json=body, headers=AUTH)
    assert needle in openai_error(r, 400, "invalid_request_error", param)


@pytest.mark.parametrize("body, needle", [
    ({**MSG, "stop_sequences": ["x" * 60]}, "at most 50"),
    ({**MSG, "tools": [{"name": "f", "input_schema": NEEDS_CHILD}], "tool_choice": {"type": "any"}},
     "tools[0] (f) schema cannot be satisfied"),
])
def test_anthropic_limits_and_unsatisfiable_schemas(served, body, needle):
    r = httpx.post(url_of(served) + "/v1/messages", json=body, headers=AUTH)
    assert needle in anthropic_error(r, 400, "invalid_request_error")


def url_of(served) -> str:
    return served[0]


def test_required_tool_choice_always_yields_a_call(served):
    """Stop strings cut text; with `required` the reply is only a tool-call section, so they do not apply."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"enum": [1, 2, 3]}}, "required": ["x"], "additionalProperties": False}}}]
    body = {**CHAT, "tools": tools, "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 40,
            "temperature": 0, "stop": ["functions", "{", "x"]}
    r = httpx.post(url_of(served) + "/v1/chat/completions", json=body, headers=AUTH)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])["x"] in (1, 2, 3)


def test_405_keeps_the_allow_header(served):
    r = httpx.get(url_of(served) + "/v1/chat/completions", headers=AUTH)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["message"]


def test_openapi_documents_the_real_errors(served):
    spec = httpx.get(url_of(served) + "/openapi.json").json()
    assert "422" not in json.dumps(spec["paths"])
    schemas = spec["components"]["schemas"]
    for path, envelope in (("/v1/chat/completions", "OpenAIError"), ("/v1/completions", "OpenAIError"),
                           ("/v1/messages", "AnthropicError")):
        responses = spec["paths"][path]["post"]["responses"]
        for status in ("400", "401", "404", "413", "429", "500", "504"):
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref == f"#/components/schemas/{envelope}"
        assert responses["429"]["headers"]["Retry-After"]["required"]
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        assert spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert schemas["OpenAIError"]["properties"]["error"]
    assert "401" in spec["paths"]["/metrics"]["get"]["responses"]


def test_request_time_limit(model_dir):
    """Past --request-timeout a request ends with a named 504 (or, streaming, an error event) and frees its pages."""
    long_json = {"type": "object", "properties": {"t": {"type": "string", "minLength": 900}}, "required": ["t"]}
    body = {**CHAT, "max_tokens": 960, "response_format": {"type": "json_schema", "json_schema": {
        "name": "s", "schema": long_json}}}
    state = make_state(model_dir, limits=ServerLimits(request_timeout_s=1.0))
    with ServerThread(state) as url:
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
        assert "time limit" in openai_error(r, 504, "timeout_error")
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, headers=AUTH,
                          timeout=60) as r:
            events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        assert events[-1]["error"]["type"] == "timeout_error" and events[-1]["error"]["code"] == "request_timeout"
        assert any(e.get("choices") and e["choices"][0]["delta"].get("content") for e in events[:-1])
        msg = {**MSG, "max_tokens": 800, "stream": True, "tools": [{"name": "f", "input_schema": long_json}],
               "tool_choice": {"type": "any"}}
        with httpx.stream("POST", url + "/v1/messages", json=msg, headers=AUTH, timeout=60) as r:
            assert r.status_code == 200
            lines = [x for x in r.iter_lines() if x]
        assert lines[-2] == "event: error" and json.loads(lines[-1][6:])["error"]["type"] == "timeout_error"
        deadline = time.monotonic() + 20
        while state.engine.stats()["pages_used"] and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = state.engine.stats()
        assert (stats["running"], stats["waiting"], stats["pages_used"]) == (0, 0, 0)


KEY = "clé-ключ-🔑"


def test_api_keys(model_dir):
    with pytest.raises(ValueError, match="must not be empty"):
        make_state(model_dir, api_key="")
    state = make_state(model_dir, api_key=KEY)
    utf8 = b"Bearer " + KEY.encode()
    with ServerThread(state) as url:
        def status(path="/v1/models", **headers):
            return httpx.get(url + path, headers=headers).status_code

        assert status(authorization=utf8) == 200  # a non-ASCII key sent as UTF-8
        assert status(**{"x-api-key": KEY.encode()}) == 200
        assert status(authorization=utf8, **{"x-api-key": b"wrong"}) == 200  # either credential may match
        assert status(authorization=b"Bearer wrong", **{"x-api-key": KEY.encode()}) == 200
        assert status(authorization=b"Bearer wrong", **{"x-api-key": b"wrong"}) == 401
        assert status() == 401
        assert status("/metrics") == 401 and status("/metrics", authorization=utf8) == 200
        assert status("/health") == 200
    with ServerThread(make_state(model_dir, api_key=KEY, public_metrics=True)) as url:
        assert httpx.get(url + "/metrics").status_code == 200
        assert httpx.get(url + "/v1/models").status_code == 401


def test_serve_refuses_an_empty_api_key(capsys, monkeypatch):
    from kimi_k2.cli import main

    monkeypatch.delenv("KIMI_K2_API_KEY", raising=False)
    assert main(["serve", "--api-key", ""]) == 2
    assert "--api-key is empty" in capsys.readouterr().err
    monkeypatch.setenv("KIMI_K2_API_KEY", "")
    assert main(["serve"]) == 2
    assert "KIMI_K2_API_KEY is set but empty" in capsys.readouterr().err


def test_serve_flags_set_every_limit(capsys, monkeypatch):
    """Each limit has a `kimi-k2 serve` flag that reaches ServerLimits; a bad value is a usage error before the model
    loads; the defaults are ServerLimits' own."""
    from kimi_k2.cli import command_parser, main
    from kimi_k2.cli.serve import server_limits

    parser = command_parser("serve")
    limits = server_limits(parser.parse_args([
        "--max-request-bytes", "1000", "--max-stop-sequences", "2", "--max-stop-chars", "30", "--max-tools", "5",
        "--max-schema-bytes", "700", "--max-prompt-tokens", "90", "--max-queued-requests", "7",
        "--request-timeout", "2.5"]))
    assert limits == ServerLimits(max_request_bytes=1000, max_stop_sequences=2, max_stop_chars=30, max_tools=5,
                                  max_schema_bytes=700, max_prompt_tokens=90, max_queued_requests=7,
                                  request_timeout_s=2.5)
    assert server_limits(parser.parse_args([])) == ServerLimits()
    assert server_limits(parser.parse_args(["--request-timeout", "0"])).request_timeout_s is None
    monkeypatch.delenv("KIMI_K2_API_KEY", raising=False)
    assert main(["serve", "/nonexistent-model", "--max-queued-requests", "0"]) == 2
    assert "max_queued_requests (--max-queued-requests) must be an int >= 1" in capsys.readouterr().err


def test_memory_of_a_big_body_is_handed_back(served, monkeypatch):
    """glibc keeps the heap that multi-MB bodies were parsed in (RSS stayed ~40 MB up after bench_abuse's huge
    bodies): the server calls malloc_trim once such a request is done, and only then."""
    from kimi_k2.server import app

    if app.MALLOC_TRIM is None:
        pytest.skip("not glibc")
    calls = []
    monkeypatch.setattr(app, "TRIM_AFTER_BYTES", 20_000)
    monkeypatch.setattr(app, "MALLOC_TRIM", lambda pad: calls.append(pad))
    url, _ = served
    assert httpx.post(url + "/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
    assert calls == []
    big = {**CHAT, "messages": [{"role": "user", "content": "x " * 15_000}]}
    r = httpx.post(url + "/v1/chat/completions", json=big, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls == [0]
