"""The OpenAI-compatible API of a real uvicorn server, driven by the official `openai` client, on a random k2-tiny
model: the model card's client loops unchanged, tool calls made real by constrained decoding, stream == non-stream."""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from server_fixtures import ALIASES, API_KEY, MODEL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import model_card  # noqa: E402

CITY = {"type": "object", "required": ["city"], "additionalProperties": False,
        "properties": {"city": {"type": "string", "enum": ["Beijing", "Paris", "Lima"]}}}
ADD = {"type": "object", "required": ["a", "b"], "additionalProperties": False,
       "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "boolean"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": CITY}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
SCHEMAS = {"get_weather": CITY, "add": ADD}
ASK = [{"role": "user", "content": "What's the weather like in Beijing today?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0)


def check_call(call, tools=SCHEMAS):
    """A returned tool call: K2-native id, a declared tool, arguments valid against its schema."""
    name = call.function.name
    assert name in tools
    assert call.id.startswith(f"functions.{name}:")
    args = json.loads(call.function.arguments)
    schema = tools[name]
    assert set(args) == set(schema["required"])
    for k, v in args.items():
        prop = schema["properties"][k]
        if "enum" in prop:
            assert v in prop["enum"]
        if prop["type"] == "integer":
            assert isinstance(v, int) and prop["minimum"] <= v <= prop["maximum"]
        if prop["type"] == "boolean":
            assert isinstance(v, bool)
    return args


def stream_chat(client, **kw):
    """Accumulate a streamed chat completion the way the model card's streaming loop does."""
    text, calls, finish, usage, roles = "", {}, None, None, 0
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        roles += delta.role == "assistant"
        text += delta.content or ""
        for tc in delta.tool_calls or ():
            c = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            if tc.id:
                assert not c["id"], "a call's id is sent once"
                c["id"] = tc.id
                assert tc.function.name and not tc.function.arguments, "name first, argument diffs after"
            c["name"] += tc.function.name or ""
            c["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert roles == 1
    return text, [calls[i] for i in sorted(calls)], finish, usage


def test_model_card_simple_chat_unchanged(client, capsys):
    model_card.simple_chat(client, "moonshotai/Kimi-K2-Instruct")
    out = capsys.readouterr().out
    assert out.strip() and out.splitlines()[0] != "None"
    assert "<|reserved_token_" not in out, "special tokens are not part of a chat reply"


def test_model_card_tool_loops_unchanged(client, capsys):
    model_card.tool_call_with_client(client, MODEL)
    model_card.tool_call_streaming(client, MODEL)
    assert "-" * 100 in capsys.readouterr().out


def test_tool_call_round_trip_with_required(client):
    """The model card loop with tool_choice="required" on the first turn: the call is real, the result goes back
    under the K2 id, and the next turn continues the running id counter."""
    messages = list(ASK)
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="required",
                                           temperature=0.6, seed=1, max_tokens=400)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    messages.append(choice.message)
    for call in choice.message.tool_calls:
        check_call(call)
        messages.append({"role": "tool", "tool_call_id": call.id, "name": call.function.name,
                         "content": json.dumps({"weather": "Sunny"})})
    n = len(choice.message.tool_calls)
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="required",
                                            temperature=0.6, seed=2, parallel_tool_calls=False)
    (call,) = second.choices[0].message.tool_calls
    check_call(call)
    assert call.id.endswith(f":{n}"), "ids continue the conversation-wide counter"


@pytest.mark.parametrize("tool_choice", ["none", "auto", "required", {"type": "function", "function": {"name": "add"}}])
def test_stream_equals_non_stream_greedy(client, tool_choice):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice, temperature=0, max_tokens=40)
    full = client.chat.completions.create(**kw)
    text, calls, finish, usage = stream_chat(client, **kw)
    msg = full.choices[0].message
    assert text == (msg.content or "")
    assert calls == [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                     for c in msg.tool_calls or ()]
    assert finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens
    if tool_choice == "none":
        assert not msg.tool_calls and "<|" not in text
    if tool_choice != "none" and tool_choice != "auto":
        assert finish == "tool_calls"
        names = {check_call(c) and c.function.name for c in msg.tool_calls}
        assert names <= ({"add"} if isinstance(tool_choice, dict) else set(SCHEMAS))


def test_parallel_tool_calls_false_gives_one_call(client):
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=1.0, seed=seed)
        assert len(r.choices[0].message.tool_calls) == 1
        check_call(r.choices[0].message.tool_calls[0])


def test_response_format_json_schema(client):
    schema = {"type": "object", "required": ["answer", "ok"], "additionalProperties": False,
              "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 9}, "ok": {"type": "boolean"}}}
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, response_format=rf, temperature=0.8, seed=3)
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"answer", "ok"} and 0 <= value["answer"] <= 9 and isinstance(value["ok"], bool)
    assert r.choices[0].finish_reason == "stop"


def test_response_format_json_object_starts_an_object(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"},
                                       temperature=0, max_tokens=6)
    assert r.choices[0].message.content.startswith("{")


def test_foreign_history_ids_continue_the_k2_counter(client):
    """History written by another server (ids like call_abc) is renumbered by the template; new ids follow it."""
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_abc", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": true}'}},
        {"id": "call_def", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "2"},
        {"role": "tool", "tool_call_id": "call_def", "content": "sunny"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, temperature=0)
    (call,) = r.choices[0].message.tool_calls
    assert call.id == f"functions.{call.function.name}:2"


def test_usage_counts_prompt_and_completion_tokens(server, client):
    _, state = server
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_completion_tokens=7)
    prompt = state.tokenizer.apply_chat_template(ASK, tokenize=True)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == len(prompt) + 7


def test_seed_and_logprobs(client):
    kw = dict(model=MODEL, messages=ASK, temperature=1.0, max_tokens=8, seed=42, logprobs=True, top_logprobs=3)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    lps = a.choices[0].logprobs.content
    assert len(lps) == 8 and a.usage.completion_tokens == 8
    for lp in lps:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 3
        tops = [t.logprob for t in lp.top_logprobs]
        assert tops == sorted(tops, reverse=True)


def test_n_samples(client):
    r = client.with_options(timeout=60).chat.completions.create(model=MODEL, messages=ASK, temperature=1.0,
                                                                 max_tokens=8, n=3, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 3 * 8
    assert len({c.message.content for c in r.choices}) > 1


def test_stop_string_cuts_the_text(client):
    kw = dict(model=MODEL, messages=ASK, temperature=0, max_tokens=24)
    text = client.chat.completions.create(**kw).choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip()
    r = client.chat.completions.create(stop=[stop], **kw)
    assert r.choices[0].message.content == text[:text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_completions_stream_and_echo(client):
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=10, temperature=0)
    full = client.completions.create(echo=True, **kw)
    assert full.choices[0].text.startswith("The quick brown fox")
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert "The quick brown fox" + streamed == full.choices[0].text
    assert full.usage.completion_tokens == 10


def test_models_health_metrics(server, client):
    url, _ = server
    assert [m.id for m in client.models.list().data] == ALIASES
    assert httpx.get(url + "/health").json()["status"] == "ok"
    client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
    httpx.get(url + "/v1/no/such/path", headers={"Authorization": f"Bearer {API_KEY}"})
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    assert 'kimi_k2_requests_total{path="other",status="404"}' in text and "no/such" not in text
    assert 'kimi_k2_requests_total{path="/v1/chat/completions",status="200"}' in text
    for name in ("kimi_k2_prompt_tokens_total", "kimi_k2_generation_tokens_total", "kimi_k2_engine_waiting",
                 "kimi_k2_engine_pages_used"):
        assert name in text


LONG_JSON = {"model": MODEL, "messages": ASK, "max_tokens": 500, "temperature": 1.0, "seed": 0,
             "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
                 "type": "object", "properties": {"t": {"type": "string", "minLength": 300}}, "required": ["t"]}}}}


def wait_idle(state, aborted_before: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        s = state.engine.stats()
        if (s["running"], s["waiting"], s["pages_used"]) == (0, 0, 0) and state.metrics.aborted > aborted_before:
            break
        time.sleep(0.05)
    s = state.engine.stats()
    assert (s["running"], s["waiting"], s["pages_used"]) == (0, 0, 0)
    assert state.metrics.aborted == aborted_before + 1


def test_client_disconnect_aborts_and_frees_cache(server):
    url, state = server
    aborted = state.metrics.aborted
    with httpx.stream("POST", url + "/v1/chat/completions", json={**LONG_JSON, "stream": True},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        assert state.engine.stats()["running"] + state.engine.stats()["waiting"] == 1
    wait_idle(state, aborted)


def test_non_streaming_client_gone_aborts_too(server):
    url, state = server
    aborted = state.metrics.aborted
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=LONG_JSON, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=1.0)
    wait_idle(state, aborted)


def test_chat_cli_against_server(server, monkeypatch, capsys):
    from kimi_k2.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nagain\n"))
    monkeypatch.setenv("KIMI_K2_API_KEY", API_KEY)
    assert main(["chat", "--url", server[0], "--max-tokens", "5", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert f"chatting with {ALIASES[0]}" in out
    replies = out.split("> ")[1:]  # one prompt per input line, and one that meets EOF
    assert len(replies) == 4 and replies[0].strip() and replies[0] == replies[2], "/reset restarts the conversation"


def test_serve_cli_without_model_says_how_to_get_one(tmp_path, capsys):
    from kimi_k2.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kimi-k2 serve: error:") and str(tmp_path / "missing") in err and "kimi-k2 train" in err


def test_serve_cli_compile_needs_float32(capsys):
    from kimi_k2.cli import main

    assert main(["serve", "--compile", "--dtype", "bfloat16"]) == 2
    assert "--compile needs --dtype float32" in capsys.readouterr().err
