"""Bad requests get the right status and each API's own error envelope; none reaches a 500 or hurts the server.
Graceful shutdown lets an in-flight stream finish."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

import httpx
import pytest
from server_fixtures import API_KEY, MODEL, ServerThread, free_port, make_model_dir, make_state, wait_until_healthy

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
MSG = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
LONG = " ".join(f"word{i}" for i in range(3000))


@pytest.fixture(scope="module")
def model_dir(k2_tokenizer_dir, tmp_path_factory):
    return make_model_dir(k2_tokenizer_dir, tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def url(model_dir):
    with ServerThread(make_state(model_dir)) as u:
        yield u


def openai_error(r: httpx.Response, status: int, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return err["message"]


def anthropic_error(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind
    return body["error"]["message"]


@pytest.mark.parametrize("body, status, param, needle", [
    ({**CHAT, "model": "gpt-9"}, 404, "model", "gpt-9"),
    ({k: v for k, v in CHAT.items() if k != "messages"}, 400, "messages", "messages"),
    ({**CHAT, "messages": []}, 400, "messages", "messages"),
    ({**CHAT, "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ({**CHAT, "max_tokens": 10**6}, 400, "max_tokens", "context"),
    ({**CHAT, "max_tokens": None, "messages": [{"role": "user", "content": LONG}]}, 400, "messages", "context"),
    ({**CHAT, "temperature": 7}, 400, "temperature", "temperature"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}]}, 400,
     None, "tools[0]"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, 400, None, "name"),
    ({**CHAT, "tools": [TOOL, TOOL]}, 400, None, "duplicate"),
    ({**CHAT, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, None, "'g'"),
    ({**CHAT, "tool_choice": "required"}, 400, None, "tools"),
    ({**CHAT, "tool_choice": "sometimes", "tools": [TOOL]}, 400, "tool_choice", "tool_choice"),
    ({**CHAT, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
    ({**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400, None, "schema"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     None, "image_url"),
    ({**CHAT, "messages": [{"role": "tool", "content": "x"}]}, 400, None, "tool_call_id"),
    ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, None, "role"),
    ({**CHAT, "stop": [""]}, 400, "stop", "stop"),
])
def test_openai_chat_errors(url, body, status, param, needle):
    msg = openai_error(httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH), status, param)
    assert needle in msg


def test_malformed_json_and_wrong_types(url):
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = httpx.post(url + path, content=b'{"model": "kimi', headers={**AUTH, "content-type": "application/json"})
        assert "JSON" in openai_error(r, 400)
        openai_error(httpx.post(url + path, json=[1, 2], headers=AUTH), 400)
    r = httpx.post(url + "/v1/messages", content=b"{nope", headers={**AUTH, "content-type": "application/json"})
    assert "JSON" in anthropic_error(r, 400, "invalid_request_error")


def test_completions_errors(url):
    base = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
    openai_error(httpx.post(url + "/v1/completions", json={**base, "prompt": ""}, headers=AUTH), 400, "prompt")
    openai_error(httpx.post(url + "/v1/completions", json={**base, "prompt": [10**9]}, headers=AUTH), 400, "prompt")
    openai_error(httpx.post(url + "/v1/completions", json={**base, "suffix": "x"}, headers=AUTH), 400, "suffix")
    assert "context" in openai_error(httpx.post(url + "/v1/completions", json={**base, "prompt": LONG},
                                                headers=AUTH), 400)


@pytest.mark.parametrize("body, status, kind, needle", [
    ({k: v for k, v in MSG.items() if k != "max_tokens"}, 400, "invalid_request_error", "max_tokens"),
    ({**MSG, "max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
    ({**MSG, "max_tokens": 10**6}, 400, "invalid_request_error", "context"),
    ({**MSG, "model": "claude-x"}, 404, "not_found_error", "claude-x"),
    ({**MSG, "temperature": 1.5}, 400, "invalid_request_error", "temperature"),
    ({**MSG, "tools": [{"name": "f", "input_schema": {"type": 3}}]}, 400, "invalid_request_error", "tools[0]"),
    ({**MSG, "tools": [{"name": "f", "input_schema": {}}], "tool_choice": {"type": "tool", "name": "g"}}, 400,
     "invalid_request_error", "'g'"),
    ({**MSG, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope"}]}]}, 400,
     "invalid_request_error", "nope"),
    ({**MSG, "messages": [{"role": "system", "content": "x"}]}, 400, "invalid_request_error", "role"),
    ({**MSG, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400,
     "invalid_request_error", "image"),
])
def test_anthropic_errors(url, body, status, kind, needle):
    assert needle in anthropic_error(httpx.post(url + "/v1/messages", json=body, headers=AUTH), status, kind)


def test_api_key(url):
    openai_error(httpx.post(url + "/v1/chat/completions", json=CHAT), 401)
    openai_error(httpx.post(url + "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer no"}), 401)
    openai_error(httpx.get(url + "/v1/models"), 401)
    anthropic_error(httpx.post(url + "/v1/messages", json=MSG, headers={"x-api-key": "no"}), 401,
                    "authentication_error")
    anthropic_error(httpx.post(url + "/v1/messages/count_tokens", json=MSG), 401, "authentication_error")
    assert httpx.post(url + "/v1/messages", json=MSG, headers={"x-api-key": API_KEY}).status_code == 200
    assert httpx.get(url + "/health").status_code == 200


def test_unknown_route_and_method(url):
    openai_error(httpx.get(url + "/v1/nothing", headers=AUTH), 404)
    openai_error(httpx.get(url + "/v1/chat/completions", headers=AUTH), 405)


def test_server_still_serves_after_errors(url):
    r = httpx.post(url + "/v1/chat/completions", json=CHAT, headers=AUTH)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_graceful_shutdown_finishes_in_flight_stream(model_dir):
    """Stopping the server (as on SIGTERM) lets a running stream finish: it ends with [DONE], not a cut."""
    server = ServerThread(make_state(model_dir))
    url = server.__enter__()
    lines: list[str] = []
    started = threading.Event()

    def consume():
        body = {**CHAT, "max_tokens": 80, "stream": True, "temperature": 0}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                started.set()

    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(30)
    server.stop()
    t.join(60)
    data = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert lines[-2] == "data: [DONE]" or lines[-1] == "data: [DONE]"
    assert data[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for d in data if d["choices"][0]["delta"].get("content")) >= 1


def test_serve_command_runs_and_stops_on_sigterm(model_dir):
    """`kimi-k2 serve` as users run it: a process that serves, then exits cleanly on SIGTERM."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kimi_k2.cli", "serve", str(model_dir), "--port",
                             str(port), "--api-key", API_KEY, "--served-model-name", MODEL, "--max-model-len", "512",
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc)
        models = httpx.get(url + "/v1/models", headers=AUTH).json()["data"]
        assert [(m["id"], m["max_model_len"]) for m in models] == [(MODEL, 512)]
        r = httpx.post(url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
        print(out)  # shown by pytest if anything above failed
    # uvicorn shuts down gracefully, then re-raises the captured signal: exit by SIGTERM, no traceback
    assert proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in out, out
