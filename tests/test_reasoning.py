"""The kimi_k2 reasoning parser: whole-text and streaming splits agree for every delta boundary, on the cases vLLM's
and SGLang's Kimi reasoning parsers are tested on (implicit start, empty thinking, the tool-call section ending the
reasoning, markers split across deltas) and on interleaved reasoning and tool calls."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_k2 import toolcalls
from kimi_k2.reasoning import ReasoningStreamParser, as_reasoning_content, split

SECTION = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
           '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')

CASES = [
    ("<think>step by step reasoning</think>final answer", "step by step reasoning", "final answer"),
    ("<think></think>final answer", "", "final answer"),
    ("implicit reasoning with no tags", "implicit reasoning with no tags", None),
    ("implicit start</think>answer", "implicit start", "answer"),
    ("<think>still thinking", "still thinking", None),
    ("some reasoning<|tool_calls_section_begin|>tool call data", "some reasoning",
     "<|tool_calls_section_begin|>tool call data"),
    (f"<think>need the weather</think>{SECTION}", "need the weather", SECTION),
    (f"<think>need the weather{SECTION}", "need the weather", SECTION),  # section before </think>
    (f"<think>a</think>Let me check.{SECTION}<think>b</think>done", "ab", f"Let me check.{SECTION}done"),
    ("<think>x<think>y</think>z</think>w", "xy", "zw"),  # nested <think> dropped, stray </think> dropped
    ("<think>a < b and c <| d</think>e<", "a < b and c <| d", "e<"),  # '<' that starts no marker is text
    ("<think>thinking<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}<|tool_call_end|>", "thinking",
     "<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}<|tool_call_end|>"),
    ("", "", None),
]


@pytest.mark.parametrize("text, reasoning, content", CASES)
def test_whole_text(text: str, reasoning: str, content: str | None) -> None:
    assert split(text) == (reasoning, content)


def stream(text: str, cuts: list[int], starts_in_reasoning: bool = True) -> tuple[str, str, list[dict]]:
    p = ReasoningStreamParser(starts_in_reasoning)
    deltas = []
    bounds = [0, *sorted(set(c % (len(text) + 1) for c in cuts)), len(text)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        deltas += p.feed(text[a:b])
    deltas += p.finish()
    return "".join(d.get("reasoning", "") for d in deltas), "".join(d.get("content", "") for d in deltas), deltas


@pytest.mark.parametrize("text, reasoning, content", CASES)
def test_streaming_one_character_at_a_time(text: str, reasoning: str, content: str | None) -> None:
    r, c, deltas = stream(text, list(range(len(text))))
    assert (r, c or None) == (reasoning, content)
    assert all("<think>" not in x and "</think>" not in x for d in deltas for x in d.values())


pieces = st.sampled_from(["<think>", "</think>", "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>",
                          "<|tool_call_begin|>", "<|tool_call_end|>", "<", "<|", "think", "a", " ", "é", "\n", "{}"])


@settings(max_examples=300, deadline=None)
@given(st.lists(pieces, max_size=14).map("".join), st.lists(st.integers(0, 200), max_size=8), st.booleans())
def test_streaming_equals_whole_text_for_any_split(text: str, cuts: list[int], start: bool) -> None:
    r, c, _ = stream(text, cuts, start)
    whole_r, whole_c = split(text, start)
    assert r == (whole_r or "") and (c or None) == whole_c


def test_one_feed_merges_by_kind() -> None:
    assert ReasoningStreamParser().feed("<think>a</think>b<think>c</think>d") == [
        {"reasoning": "a"}, {"content": "b"}, {"reasoning": "c"}, {"content": "d"}]
    nested = ReasoningStreamParser().feed("<think>a<think>b</think>c</think>d")
    assert nested == [{"reasoning": "ab"}, {"content": "cd"}]


def test_single_marker_deltas_emit_nothing() -> None:
    """vLLM: a delta that is just <think> or </think> produces no message."""
    p = ReasoningStreamParser()
    assert p.feed("<think>") == []
    assert p.feed("step one") == [{"reasoning": "step one"}]
    assert p.feed("</think>") == []
    assert p.feed("answer") == [{"content": "answer"}]


def test_marker_split_across_deltas_is_held_back() -> None:
    p = ReasoningStreamParser()
    assert p.feed("some reasoning</th") == [{"reasoning": "some reasoning"}]
    assert p.feed("ink>ans") == [{"content": "ans"}]
    assert p.feed("wer<|tool_calls_sec") == [{"content": "wer"}]
    assert p.feed("tion_begin|>") == [{"content": "<|tool_calls_section_begin|>"}]


def test_sglang_mode_text_without_think_is_content() -> None:
    assert split("plain answer", starts_in_reasoning=False) == (None, "plain answer")
    assert split("<think>r</think>c", starts_in_reasoning=False) == ("r", "c")


def test_tool_calls_after_reasoning_parse_from_the_content() -> None:
    text = f"<think>I should call the tool</think>Checking.{SECTION}"
    reasoning, content = split(text)
    assert reasoning == "I should call the tool"
    body, calls = toolcalls.parse(content)
    assert body == "Checking." and [c.name for c in calls] == ["get_weather"] and calls[0].error is None
    # the same when the section starts before </think>
    _, content = split(f"<think>I should call the tool{SECTION}")
    assert [c.arguments for c in toolcalls.parse(content)[1]] == ['{"city": "Paris"}']


def test_history_with_raw_think_moves_to_reasoning_content() -> None:
    m = {"role": "assistant", "content": "<think>because</think>The answer."}
    assert as_reasoning_content(m) == {"role": "assistant", "content": "The answer.", "reasoning_content": "because"}
    plain = {"role": "assistant", "content": "no thinking here"}
    assert as_reasoning_content(plain) is plain
    kept = {"role": "assistant", "content": "x</think>y", "reasoning_content": "given"}
    assert as_reasoning_content(kept) is kept
