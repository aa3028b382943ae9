"""The OpenAI Responses API (/v1/responses) of a real loopback server, driven by the official `openai` client and
raw HTTP: input items and instructions rendered as the chat API renders the same conversation, function tools and
tool outputs fed back, streaming events in OpenAI's order, structured outputs, `store: false`, errors in OpenAI's
shape. (Reasoning items and openai-agents' tool loop: tests/test_server_thinking.py.)"""

from __future__ import annotations

import json
from typing import Literal

import httpx
import openai
import pydantic
import pytest
from server_fixtures import API_KEY, MODEL

CITY = {"type": "object", "required": ["city"], "additionalProperties": False,
        "properties": {"city": {"type": "string", "enum": ["Beijing", "Paris", "Lima"]}}}
TOOL = {"type": "function", "name": "get_weather", "description": "weather", "parameters": CITY}
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0)


def test_text_response(client):
    r = client.responses.create(model=MODEL, instructions="Be brief.", input="Weather in Paris?", temperature=0,
                                max_output_tokens=6)
    assert r.object == "response" and r.store is False and r.model == MODEL
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    (msg,) = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.content[0].type == "output_text"
    assert r.output_text == msg.content[0].text and r.usage.output_tokens == 6
    chat = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=6, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}])
    assert r.output_text == chat.choices[0].message.content  # the same prompt as the chat API's
    assert r.usage.input_tokens == chat.usage.prompt_tokens


def test_input_items_render_as_the_chat_conversation(client):
    """Messages of every role, an assistant turn with a function call, and the call's output fed back."""
    call_id = "functions.get_weather:0"
    items = [{"role": "developer", "content": "Use tools."},
             {"role": "user", "content": [{"type": "input_text", "text": "Weather in Lima?"}]},
             {"type": "function_call", "call_id": call_id, "name": "get_weather", "arguments": '{"city": "Lima"}'},
             {"type": "function_call_output", "call_id": call_id, "output": '{"weather": "sunny"}'}]
    messages = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Lima?"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Lima"}'}}]},
                {"role": "tool", "tool_call_id": call_id, "name": "get_weather", "content": '{"weather": "sunny"}'}]
    r = client.responses.create(model=MODEL, input=items, tools=[TOOL], tool_choice="required", temperature=0,
                                parallel_tool_calls=False)
    chat = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, tool_choice="required",
                                          parallel_tool_calls=False, tools=[{"type": "function", "function": {
                                              k: v for k, v in TOOL.items() if k != "type"}}])
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    (call,) = [o for o in r.output if o.type == "function_call"]
    (chat_call,) = chat.choices[0].message.tool_calls
    assert (call.call_id, call.name, call.arguments) == (chat_call.id, "get_weather", chat_call.function.arguments)
    assert call.call_id == "functions.get_weather:1" and json.loads(call.arguments)["city"] in CITY["properties"][
        "city"]["enum"]


def events(url: str, body: dict) -> list[tuple[str, dict]]:
    with httpx.stream("POST", url + "/v1/responses", json={**body, "stream": True}, headers=HEADERS,
                      timeout=120) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    out = [(lines[i][7:], json.loads(lines[i + 1][6:])) for i in range(0, len(lines), 2)]
    assert all(name == data["type"] for name, data in out)  # `event:` names the data's type
    assert [d["sequence_number"] for _, d in out] == list(range(len(out)))
    return out


def test_streaming_events_in_openai_order(server, client):
    body = {"model": MODEL, "input": "Weather in Paris?", "temperature": 0, "max_output_tokens": 8}
    evs = events(server[0], body)
    kinds = [k for k, _ in evs]
    n = kinds.count("response.output_text.delta")
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * n, "response.output_text.done",
                     "response.content_part.done", "response.output_item.done", "response.incomplete"]
    text = "".join(d["delta"] for k, d in evs if k == "response.output_text.delta")
    whole = client.responses.create(**body)
    assert text == whole.output_text == evs[-1][1]["response"]["output"][0]["content"][0]["text"]
    with client.responses.stream(model=MODEL, input="Weather in Paris?", temperature=0, max_output_tokens=8) as s:
        sdk = [ev for ev in s]  # the SDK's typed events (its get_final_response wants response.completed)
    assert "".join(ev.delta for ev in sdk if ev.type == "response.output_text.delta") == text
    assert sdk[-1].type == "response.incomplete" and sdk[-1].response.output_text == text


def test_streamed_function_calls(server):
    evs = events(server[0], {"model": MODEL, "input": "Weather?", "tools": [TOOL], "tool_choice": "required",
                             "temperature": 0.7, "max_output_tokens": 400})
    kinds = [k for k, _ in evs]
    assert kinds[-1] == "response.completed"
    final = evs[-1][1]["response"]["output"]
    calls = [o for o in final if o["type"] == "function_call"]
    assert calls and all(o["status"] == "completed" for o in calls)
    for o in calls:
        args = "".join(d["delta"] for k, d in evs if k == "response.function_call_arguments.delta"
                       and d["item_id"] == o["id"])
        assert args == o["arguments"] and json.loads(args)["city"] in CITY["properties"]["city"]["enum"]


class Answer(pydantic.BaseModel):
    city: Literal["Beijing", "Paris", "Lima"]
    sunny: bool


def test_structured_output(client):
    r = client.responses.parse(model=MODEL, input="Weather?", text_format=Answer, temperature=0.7,
                                max_output_tokens=400)
    assert isinstance(r.output_parsed, Answer)


@pytest.mark.parametrize("body,status,param", [
    ({"previous_response_id": "resp_1"}, 400, "previous_response_id"),
    ({"background": True}, 400, "background"),
    ({"tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
    ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "1"}]}, 400, "input[0].call_id"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, 400, "input[0].type"),
    ({"tool_choice": "required"}, 400, None),
    ({"model": "gpt-4o"}, 404, "model"),
])
def test_errors_in_openai_shape(server, body, status, param):
    r = httpx.post(server[0] + "/v1/responses", json={"model": MODEL, "input": "hi", **body}, headers=HEADERS)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param


def test_store_false_nothing_to_retrieve(client):
    r = client.responses.create(model=MODEL, input="hi", max_output_tokens=2, store=True)
    assert r.store is False
    with pytest.raises(openai.NotFoundError, match="stores no responses"):
        client.responses.retrieve(r.id)
