"""Client libraries users point at an OpenAI-compatible server, run unchanged against a real loopback server:
langchain-openai (chat, streaming, bound tools, structured output) and litellm (completion, streaming, tools). The
official openai and anthropic SDKs: test_server_openai.py, test_server_gaps.py, test_server_responses.py,
test_server_anthropic.py; openai-agents: test_server_thinking.py."""

from __future__ import annotations

import json
import os
from typing import Literal

import pydantic
import pytest
from server_fixtures import API_KEY, MODEL

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm: no network fetch at import

CITY = {"type": "object", "required": ["city"], "additionalProperties": False,
        "properties": {"city": {"type": "string", "enum": ["Beijing", "Paris", "Lima"]}}}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": CITY}}
ASK = [{"role": "user", "content": "What's the weather like in Beijing today?"}]


class Weather(pydantic.BaseModel):
    city: Literal["Beijing", "Paris", "Lima"]
    sunny: bool


@pytest.fixture(scope="module")
def chat(server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=server[0] + "/v1", api_key=API_KEY, model=MODEL, temperature=0, max_tokens=12,
                      max_retries=0)


def test_langchain_invoke_and_stream(chat):
    whole = chat.invoke("What's the weather like in Beijing today?")
    assert whole.content and whole.response_metadata["finish_reason"] == "length"
    assert whole.usage_metadata["output_tokens"] == 12
    streamed = "".join(part.content for part in chat.stream("What's the weather like in Beijing today?"))
    assert streamed == whole.content


def test_langchain_tools_and_structured_output(chat):
    msg = chat.bind_tools([TOOL], tool_choice="required", parallel_tool_calls=False).invoke(
        "What's the weather like in Beijing today?", max_tokens=200)
    (call,) = msg.tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in CITY["properties"]["city"]["enum"]
    assert call["id"] == "functions.get_weather:0"
    out = chat.with_structured_output(Weather, method="json_schema").invoke("Weather?", max_tokens=200,
                                                                          temperature=0.7)
    assert isinstance(out, Weather)


def test_litellm_completion_stream_and_tools(server):
    import litellm

    kw = dict(model=f"openai/{MODEL}", api_base=server[0] + "/v1", api_key=API_KEY, messages=ASK, temperature=0,
              max_tokens=10)
    whole = litellm.completion(**kw)
    assert whole.choices[0].message.content and whole.usage.completion_tokens == 10
    streamed = "".join(c.choices[0].delta.content or "" for c in litellm.completion(stream=True, **kw))
    assert streamed == whole.choices[0].message.content
    r = litellm.completion(**{**kw, "max_tokens": 200}, tools=[TOOL], tool_choice="required",
                           parallel_tool_calls=False)
    (call,) = r.choices[0].message.tool_calls
    assert call.id == "functions.get_weather:0" and json.loads(call.function.arguments)["city"] in \
        CITY["properties"]["city"]["enum"]
