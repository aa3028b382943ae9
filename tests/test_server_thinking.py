"""A K2-Thinking-layout checkpoint (INT4 compressed-tensors experts, K2-Thinking tokenizer specials and template)
served with `--reasoning-parser kimi_k2` through all three APIs. The model is scripted (thinking_fixtures): after
the generation prompt it writes `<think>hmm</think>` and then a call of the tool `lookup` with `{}`, so every answer
is known in advance: reasoning_content / thinking blocks / reasoning items, a valid tool call after the reasoning,
and a history that carries the reasoning of the current tool loop as the K2-Thinking template expects."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    Runner,
    ToolsToFinalOutputResult,
    function_tool,
    set_default_openai_client,
    set_tracing_disabled,
)
from agents.models.multi_provider import MultiProvider
from agents.models.openai_responses import OpenAIResponsesModel
from server_fixtures import API_KEY, MODEL, ServerThread, make_state
from thinking_fixtures import LOOKUP_SCRIPT, LOOKUP_TOOLS, make_scripted_thinking_dir

SCRIPT, TOOLS = LOOKUP_SCRIPT, LOOKUP_TOOLS
EMPTY = {"type": "object", "properties": {}}
ASK = [{"role": "user", "content": "hi"}]
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def thinking(k2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    d = make_scripted_thinking_dir(k2_tokenizer_dir, tmp_path_factory.mktemp("thinking") / "K2-Thinking-tiny", SCRIPT)
    state = make_state(d, reasoning=True)
    with ServerThread(state) as url:
        yield url, state


@pytest.fixture(scope="module")
def oai(thinking):
    return openai.OpenAI(base_url=thinking[0] + "/v1", api_key=API_KEY, max_retries=0)


def test_openai_reasoning_then_a_valid_tool_call(oai):
    r = oai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0)
    (choice,) = r.choices
    msg = choice.message
    assert msg.reasoning_content == "hmm" and msg.content is None and choice.finish_reason == "tool_calls"
    (call,) = msg.tool_calls
    assert (call.id, call.function.name, call.function.arguments) == ("functions.lookup:0", "lookup", "{}")


def test_openai_streamed_reasoning_equals_the_whole(thinking, oai):
    reasoning, content, calls, finish = "", "", [], None
    for chunk in oai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, stream=True):
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        calls += [(tc.id, tc.function.name, tc.function.arguments) for tc in delta.tool_calls or ()]
        finish = chunk.choices[0].finish_reason or finish
    assert (reasoning, content, finish) == ("hmm", "", "tool_calls")
    assert calls[0] == ("functions.lookup:0", "lookup", "") and "".join(c[2] for c in calls) == "{}"


def test_without_tools_the_section_is_masked(thinking, oai):
    """The model opens a tool-call section right after its reasoning (raw completions show it); a chat request
    that declares no tools gets no section and no empty message."""
    st = thinking[1]
    prompt = st.tokenizer.apply_chat_template(ASK)
    raw = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert raw.choices[0].text.startswith("<think>hmm</think><|tool_calls_section_begin|>")
    for stream in (False, True):
        r = oai.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=20, stream=stream)
        if stream:
            parts = [c.choices[0].delta for c in r]
            content = "".join(p.content or "" for p in parts)
            assert not any(p.tool_calls for p in parts)
        else:
            content = r.choices[0].message.content
            assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason == "stop"
            assert r.choices[0].message.reasoning_content == "hmm"
        assert content and "<|" not in content and "think>" not in content


def test_history_carries_the_reasoning_of_the_tool_loop(thinking, oai):
    """A tool loop: the call turn goes back with its reasoning_content (or as the raw `<think>` text, or under
    vLLM's newer `reasoning` name); the template keeps that reasoning in the prompt (it belongs to the current
    turn), so all three prompts are the same, and longer than one with the reasoning left out."""
    st = thinking[1]
    first = oai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0).choices[0].message
    call = first.tool_calls[0].model_dump()
    result = {"role": "tool", "tool_call_id": call["id"], "name": "lookup", "content": "42"}
    turns = {
        "reasoning_content": {"role": "assistant", "content": "", "reasoning_content": "hmm", "tool_calls": [call]},
        "reasoning": {"role": "assistant", "content": "", "reasoning": "hmm", "tool_calls": [call]},
        "raw": {"role": "assistant", "content": "<think>hmm</think>", "tool_calls": [call]},
    }
    def prompt_tokens(turn: dict) -> int:
        r = oai.chat.completions.create(model=MODEL, messages=[*ASK, turn, result], tools=TOOLS, temperature=0)
        (again,) = r.choices[0].message.tool_calls  # the call after the reasoning is valid, its id the next one
        assert again.id == "functions.lookup:1" and r.choices[0].message.reasoning_content == "hmm"
        return r.usage.prompt_tokens

    counts = {name: prompt_tokens(turn) for name, turn in turns.items()}
    without = prompt_tokens({"role": "assistant", "content": "", "tool_calls": [call]})
    assert set(counts.values()) == {without + len(st.tokenizer.encode("hmm"))}, counts
    with pytest.raises(openai.BadRequestError, match="reasoning_content is only allowed on assistant"):
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x", "reasoning_content": "y"}])


ANTHROPIC_TOOLS = [{"name": "lookup", "description": "look it up", "input_schema": EMPTY}]


def test_anthropic_thinking_block_then_tool_use(thinking):
    client = anthropic.Anthropic(base_url=thinking[0], api_key=API_KEY, max_retries=0)
    kw = dict(model=MODEL, max_tokens=64, messages=ASK, tools=ANTHROPIC_TOOLS, extra_body={"temperature": 0},
              thinking={"type": "enabled", "budget_tokens": 32})  # accepted; K2-Thinking always reasons
    full = client.messages.create(**kw)
    assert [b.type for b in full.content] == ["thinking", "tool_use"] and full.stop_reason == "tool_use"
    assert full.content[0].thinking == "hmm"
    assert (full.content[1].id, full.content[1].name, full.content[1].input) == ("functions.lookup:0", "lookup", {})
    with client.messages.stream(**kw) as s:
        deltas = [ev.delta.type for ev in s if ev.type == "content_block_delta"]
        streamed = s.get_final_message()
    assert [b.model_dump(exclude={"signature"}) for b in streamed.content] == \
        [b.model_dump(exclude={"signature"}) for b in full.content]
    assert deltas[0] == "thinking_delta" and "input_json_delta" in deltas
    # the thinking block sent back is the turn's reasoning in the prompt, as OpenAI's reasoning_content is
    history = [*ASK, {"role": "assistant", "content": [b.model_dump() for b in full.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "functions.lookup:0",
                                             "content": "42"}]}]
    counted = client.messages.count_tokens(model=MODEL, messages=history, tools=ANTHROPIC_TOOLS).input_tokens
    bare = [history[0], {"role": "assistant", "content": [b.model_dump() for b in full.content[1:]]}, history[2]]
    assert counted > client.messages.count_tokens(model=MODEL, messages=bare, tools=ANTHROPIC_TOOLS).input_tokens
    no_tools = client.messages.create(model=MODEL, max_tokens=20, messages=ASK, extra_body={"temperature": 0})
    assert [b.type for b in no_tools.content] == ["thinking", "text"] and no_tools.content[1].text


def test_responses_reasoning_item_then_function_call(thinking, oai):
    r = oai.responses.create(model=MODEL, input="hi", tools=[{"type": "function", "name": "lookup",
                                                                 "parameters": EMPTY}], temperature=0)
    assert [o.type for o in r.output] == ["reasoning", "function_call"] and r.status == "completed"
    assert r.output[0].content[0].text == "hmm"
    assert (r.output[1].call_id, r.output[1].name, r.output[1].arguments) == ("functions.lookup:0", "lookup", "{}")
    assert r.usage.output_tokens_details.reasoning_tokens >= 3
    body = {"model": MODEL, "input": "hi", "tools": [{"type": "function", "name": "lookup", "parameters": EMPTY}],
            "temperature": 0, "stream": True}
    with httpx.stream("POST", thinking[0] + "/v1/responses", json=body, headers=HEADERS, timeout=60) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    args_delta = "response.function_call_arguments.delta"
    assert kinds == ["response.created", "response.in_progress",
                     "response.output_item.added", "response.content_part.added",
                     *["response.reasoning_text.delta"] * kinds.count("response.reasoning_text.delta"),
                     "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
                     "response.output_item.added",
                     *[args_delta] * kinds.count(args_delta),
                     "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert [o["type"] for o in final["output"]] == ["reasoning", "function_call"]


def test_openai_agents_default_model_runs_a_tool_loop(thinking):
    """openai-agents with its default model class (OpenAIResponsesModel over /v1/responses): the model reasons and
    calls `lookup`, the SDK runs it and sends its output back (with the reasoning item), the model calls again with
    the next K2 id (so the fed-back history reached it), and the loop ends after the second result."""
    set_tracing_disabled(True)
    set_default_openai_client(openai.AsyncOpenAI(base_url=thinking[0] + "/v1", api_key=API_KEY, max_retries=0),
                              use_for_tracing=False)
    results: list[str] = []

    @function_tool
    def lookup() -> str:
        """Look it up."""
        results.append(f"result {len(results) + 1}")
        return results[-1]

    def after_two(ctx, tool_results) -> ToolsToFinalOutputResult:
        done = len(results) >= 2
        return ToolsToFinalOutputResult(is_final_output=done, final_output=tool_results[-1].output if done else None)

    agent = Agent(name="k2", instructions="Answer briefly.", tools=[lookup], model=MODEL,
                  model_settings=ModelSettings(temperature=0), tool_use_behavior=after_two)
    run = asyncio.run(Runner.run(agent, "hi", max_turns=4))
    assert run.final_output == "result 2" and len(run.raw_responses) == 2
    kinds = [(type(i).__name__, getattr(i.raw_item, "call_id", None) if not isinstance(i.raw_item, dict)
              else i.raw_item["call_id"]) for i in run.new_items]
    assert kinds == [("ReasoningItem", None), ("ToolCallItem", "functions.lookup:0"),
                     ("ToolCallOutputItem", "functions.lookup:0"), ("ReasoningItem", None),
                     ("ToolCallItem", "functions.lookup:1"), ("ToolCallOutputItem", "functions.lookup:1")]
    first, second = (r.usage.input_tokens for r in run.raw_responses)
    assert second > first
    assert isinstance(MultiProvider().get_model(MODEL), OpenAIResponsesModel)  # the default model class
