"""The Anthropic Messages API of a real uvicorn server, driven by the official `anthropic` client."""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import pytest
from server_fixtures import API_KEY, MODEL

CITY = {"type": "object", "required": ["city"], "additionalProperties": False,
        "properties": {"city": {"type": "string", "enum": ["Beijing", "Paris", "Lima"]}}}
TOOLS = [{"name": "get_weather", "description": "weather", "input_schema": CITY},
         {"name": "get_time", "input_schema": {"type": "object", "additionalProperties": False, "required": ["tz"],
                                               "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}}}}]
ASK = [{"role": "user", "content": "What's the weather like in Beijing today?"}]


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server[0], api_key=API_KEY, max_retries=0)


def blocks(message) -> list[dict]:
    return [b.model_dump(include={"type", "text", "id", "name", "input"}) for b in message.content]


@pytest.mark.parametrize("tool_choice", [None, {"type": "any"}, {"type": "tool", "name": "get_time"},
                                         {"type": "none"}, {"type": "any", "disable_parallel_tool_use": True}])
def test_stream_equals_non_stream_greedy(client, tool_choice):
    kw = dict(model=MODEL, max_tokens=60, messages=ASK, tools=TOOLS, extra_body={"temperature": 0})
    if tool_choice is not None:
        kw["tool_choice"] = tool_choice
    full = client.messages.create(**kw)
    with client.messages.stream(**kw) as s:
        kinds = [ev.type for ev in s]
        streamed = s.get_final_message()
    assert blocks(streamed) == blocks(full)
    assert (streamed.stop_reason, streamed.usage.output_tokens) == (full.stop_reason, full.usage.output_tokens)
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    uses = [b for b in full.content if b.type == "tool_use"]
    if tool_choice and tool_choice["type"] in ("any", "tool"):
        assert full.stop_reason in ("tool_use", "max_tokens") and uses
        if full.stop_reason == "tool_use":
            assert all(u.id.startswith(f"functions.{u.name}:") for u in uses)
    if tool_choice and tool_choice["type"] == "tool":
        assert {u.name for u in uses} == {"get_time"}
    if tool_choice and tool_choice.get("disable_parallel_tool_use"):
        assert len(uses) == 1 and full.stop_reason == "tool_use"
    if tool_choice and tool_choice["type"] == "none":
        assert not uses


def test_raw_event_sequence(server):
    """Every block is start, deltas, stop with its index; usage in message_delta is cumulative; ping present."""
    url, _ = server
    body = {"model": MODEL, "max_tokens": 40, "messages": ASK, "tools": TOOLS, "tool_choice": {"type": "any"},
            "stream": True, "temperature": 0}
    with httpx.stream("POST", url + "/v1/messages", json=body, headers={"x-api-key": API_KEY}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = []
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["type"] == kind
                events.append(data)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["message_start", "ping"] and kinds[-2:] == ["message_delta", "message_stop"]
    open_block, args, closed = None, "", []
    for e in events:
        if e["type"] == "content_block_start":
            assert open_block is None and e["content_block"]["type"] == "tool_use" and e["content_block"]["input"] == {}
            open_block = e["index"]
        elif e["type"] == "content_block_delta":
            assert e["index"] == open_block and e["delta"]["type"] == "input_json_delta"
            args += e["delta"]["partial_json"]
        elif e["type"] == "content_block_stop":
            assert e["index"] == open_block == len(closed)
            closed.append(args)
            open_block, args = None, ""
    complete = closed if events[-2]["delta"]["stop_reason"] == "tool_use" else closed[:-1]
    assert closed and all(isinstance(json.loads(a), dict) for a in complete)
    assert events[-2]["usage"]["output_tokens"] >= 1


def test_tool_result_round_trip_and_count_tokens(client):
    first = client.messages.create(model=MODEL, max_tokens=200, messages=ASK, tools=TOOLS,
                                   tool_choice={"type": "tool", "name": "get_weather",
                                                "disable_parallel_tool_use": True}, extra_body={"temperature": 0.5})
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input["city"] in ("Beijing", "Paris", "Lima")
    messages = [*ASK, {"role": "assistant", "content": first.content},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                              "content": [{"type": "text", "text": "Sunny"}]},
                                             {"type": "text", "text": "And tomorrow?"}]}]
    second = client.messages.create(model=MODEL, max_tokens=200, messages=messages, tools=TOOLS,
                                    tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                    extra_body={"temperature": 0.5})
    (use2,) = [b for b in second.content if b.type == "tool_use"]
    assert use2.id.endswith(":1"), "the K2 call counter runs across the conversation"
    count = client.messages.count_tokens(model=MODEL, messages=messages, tools=TOOLS)
    assert count.input_tokens == second.usage.input_tokens


def test_temperature_is_scaled(server, client, monkeypatch):
    """Requested temperature x 0.6 reaches the engine (Moonshot's Anthropic mapping). This SDK version has no
    temperature argument any more: it goes in extra_body, as any client may send it."""
    _, state = server
    seen = []
    real = state.engine.generate

    def spy(prompt, params, **kw):
        seen.append(params.temperature)
        return real(prompt, params, **kw)

    monkeypatch.setattr(state.engine, "generate", spy)
    client.messages.create(model=MODEL, max_tokens=2, messages=ASK, extra_body={"temperature": 0.5})
    client.messages.create(model=MODEL, max_tokens=2, messages=ASK)
    assert seen == [pytest.approx(0.3), pytest.approx(0.6)]


def test_stop_sequences_and_system(client):
    kw = dict(model=MODEL, max_tokens=24, messages=ASK, system="You are Kimi.", extra_body={"temperature": 0})
    text = client.messages.create(**kw).content[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    r = client.messages.create(stop_sequences=[stop], **kw)
    assert r.content[0].text == text[:text.index(stop)]
    assert (r.stop_reason, r.stop_sequence) == ("stop_sequence", stop)
    r = client.messages.create(**{**kw, "max_tokens": 5})
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 5


def test_stream_disconnect_aborts_and_frees_cache(server):
    url, state = server
    long_tool = [{"name": "note", "input_schema": {"type": "object", "required": ["t"],
                                                   "properties": {"t": {"type": "string", "minLength": 300}}}}]
    body = {"model": MODEL, "max_tokens": 500, "messages": ASK, "tools": long_tool,
            "tool_choice": {"type": "tool", "name": "note"}, "stream": True}
    aborted = state.metrics.aborted
    with httpx.stream("POST", url + "/v1/messages", json=body, headers={"x-api-key": API_KEY}, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(12):
            next(lines)
        assert state.engine.stats()["running"] == 1
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (state.engine.stats()["pages_used"] or state.metrics.aborted == aborted):
        time.sleep(0.05)
    s = state.engine.stats()
    assert (s["running"], s["waiting"], s["pages_used"], state.metrics.aborted) == (0, 0, 0, aborted + 1)
