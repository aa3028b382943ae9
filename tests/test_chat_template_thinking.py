"""Kimi-K2-Thinking's chat template as a built-in option: golden prompts (reasoning kept for the current tool loop,
dropped before the last answer, compact tool JSON), parity with Hugging Face's renderer, and safe tokenization of
the <think> markers."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from thinking_fixtures import thinking_tokenizer_files
from transformers.utils.chat_template_utils import render_jinja_template

from kimi_k2.tokenizer import Tokenizer
from kimi_k2.tokenizer.chat_template import builtin_template, deep_sort, normalize_messages

SYS = "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
GEN = "<|im_assistant|>assistant<|im_middle|>"
CALL = {"id": "functions.get_weather:0", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def tok(k2_tokenizer_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("thinking_tok")
    thinking_tokenizer_files(k2_tokenizer_dir, d)
    return Tokenizer.from_pretrained(d)


def test_the_builtin_template_is_loaded_from_the_directory(tok):
    assert tok.chat_template == builtin_template("kimi_k2_thinking") != builtin_template()
    with pytest.raises(ValueError, match="unknown built-in chat template"):
        builtin_template("chatml")


def test_tool_loop_keeps_its_reasoning(tok):
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "reasoning_content": "I need the tool.", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"}]
    compact = json.dumps([deep_sort(WEATHER)], separators=(",", ":"))
    assert tok.apply_chat_template(msgs, tools=[WEATHER]) == (
        f"<|im_system|>tool_declare<|im_middle|>{compact}<|im_end|>{SYS}"
        "<|im_user|>user<|im_middle|>Weather in Paris?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><think>I need the tool.</think><|tool_calls_section_begin|>"
        '<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\nsunny<|im_end|>" + GEN)


def test_reasoning_before_the_last_answer_is_dropped(tok):
    msgs = [{"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "reasoning_content": "old thoughts"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "", "reasoning_content": "new thoughts", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"}]
    out = tok.apply_chat_template(msgs)
    assert "<think></think>b<|im_end|>" in out and "old thoughts" not in out
    assert "<think>new thoughts</think><|tool_calls_section_begin|>" in out
    assert tok.apply_chat_template(msgs[:2] + [{"role": "assistant", "content": "d", "reasoning_content": None}])


def test_reasoning_content_must_be_a_string_on_an_assistant(tok):
    with pytest.raises(ValueError, match="reasoning_content"):
        tok.apply_chat_template([{"role": "user", "content": "x", "reasoning_content": "y"}])
    with pytest.raises(ValueError, match="reasoning_content"):
        tok.apply_chat_template([{"role": "assistant", "content": "x", "reasoning_content": ["y"]}])


def test_think_markers_are_tokens_and_reasoning_text_is_data(tok):
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "reasoning_content": "fake </think> inside", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "r"}]
    ids = tok.apply_chat_template(msgs, tokenize=True)
    end = tok.token_to_id("</think>")
    assert ids.count(tok.token_to_id("<think>")) == 1 and ids.count(end) == 1  # the template's own, not the data's
    assert tok.decode(ids) == tok.apply_chat_template(msgs)
    assert tok.decode([end], skip_special_tokens=True) == "</think>"  # kept for the reasoning parser


text = st.lists(st.sampled_from(list("ab <>|/") + ["<think>", "</think>", "你"]), max_size=8).map("".join)


@st.composite
def loops(draw):
    msgs = []
    for turn in range(draw(st.integers(1, 3))):
        msgs.append({"role": "user", "content": draw(text)})
        for k in range(draw(st.integers(0, 2))):
            call = {"id": f"functions.f:{turn}{k}", "type": "function",
                    "function": {"name": "f", "arguments": json.dumps({"x": draw(text)})}}
            msgs.append({"role": "assistant", "content": draw(text), "reasoning_content": draw(text),
                         "tool_calls": [call]})
            msgs.append({"role": "tool", "tool_call_id": call["id"], "content": draw(text)})
        if draw(st.booleans()):
            msgs.append({"role": "assistant", "content": draw(text), "reasoning_content": draw(text)})
    return msgs


@settings(max_examples=60, deadline=None)
@given(loops(), st.booleans(), st.booleans())
def test_matches_transformers_renderer(tok, msgs, gen, with_tools):
    tools = [WEATHER] if with_tools else None
    hf, _ = render_jinja_template([normalize_messages(msgs)], tools=deep_sort(tools) if tools else None,
                                  chat_template=builtin_template("kimi_k2_thinking"), add_generation_prompt=gen)
    assert tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen) == hf[0]
