"""Tool-call codec: golden parses of real-world K2 output shapes, streaming == whole-text parsing at every split,
render/parse round trip, and render == what the chat template writes for the same calls."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_k2.tokenizer import IncrementalDetokenizer, Tokenizer
from kimi_k2.toolcalls import ToolCall, ToolCallError, ToolCallStreamParser, parse, render, tool_call_id

B, E = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def call(i, name, args):
    return f"{CB}functions.{name}:{i}{AB}{args}{CE}"


def test_plain_text_has_no_calls():
    assert parse("Just an answer <|im not a marker|> a < b") == ("Just an answer <|im not a marker|> a < b", [])


def test_content_and_one_call():
    content, calls = parse("Let me check." + B + call(0, "get_weather", '{"city": "Paris"}') + E)
    assert content == "Let me check."
    assert calls == [ToolCall("functions.get_weather:0", "get_weather", '{"city": "Paris"}')]
    assert calls[0].parsed_arguments() == {"city": "Paris"}
    assert calls[0].to_openai() == {"id": "functions.get_weather:0", "type": "function",
                                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def test_whitespace_pretty_json_and_back_to_back_calls():
    pretty = json.dumps({"city": "Paris", "units": {"temp": "C"}}, indent=2)
    text = (f"{B}\n{CB}\nfunctions.get_weather:0 {AB} {pretty} {CE}"
            f'{CB}functions.search:1{AB}{{"q": "<div>x</div>"}}{CE}{CB}functions.noop:2{AB}{{}}{CE}\n{E}')
    content, calls = parse(text)
    assert content == ""
    assert [(c.id, c.name, c.error) for c in calls] == [
        ("functions.get_weather:0", "get_weather", None), ("functions.search:1", "search", None),
        ("functions.noop:2", "noop", None)]
    assert calls[0].arguments == pretty
    assert calls[1].parsed_arguments() == {"q": "<div>x</div>"}


def test_variants_seen_in_the_wild():
    # singular section marker, bare `name:idx` id, arguments as a JSON-encoded string (Kimi-K2 issue #26)
    encoded = json.dumps(json.dumps({"todos": [1, 2]}))
    content, calls = parse(f"<|tool_call_section_begin|>{CB}TodoWrite:1{AB}{encoded}{CE}<|tool_call_section_end|>")
    assert content == ""
    assert calls == [ToolCall("TodoWrite:1", "TodoWrite", '{"todos": [1, 2]}')]


def test_missing_section_end_and_text_after_section():
    assert parse(f"{B}{call(0, 'f', '{}')}") == ("", [ToolCall("functions.f:0", "f", "{}")])
    assert parse(f"a{B}{call(0, 'f', '{}')}{E}b")[0] == "ab"


@pytest.mark.parametrize("body, error", [
    (f"{CB}functions.f:0{AB}{{\"a\": 1{CE}", "not valid JSON"),
    (f"{CB}functions.f:0{AB}[1, 2]{CE}", "must be a JSON object"),
    (f"{CB}functions.f:0{AB}\"not json inside\"{CE}", "does not hold JSON"),
    (f"{CB}functions.invalid_get_weather.0{AB}{{}}{CE}", "malformed tool-call id"),
    (f"{CB}functions.f:0{CE}", "no arguments"),
    (f"{CB}functions.f:0{AB}{{\"a\": ", "not valid JSON"),  # cut off by max_tokens
])
def test_malformed_calls_are_reported(body, error):
    _, calls = parse(f"{B}{body}")
    assert len(calls) == 1 and error in calls[0].error
    with pytest.raises(ToolCallError, match=error.split()[0]):
        calls[0].parsed_arguments()


def test_marker_text_never_reaches_content():
    text = f"x{CE}{AB}y{E}"  # stray markers outside a section
    assert parse(text) == ("xy", [])
    p = ToolCallStreamParser()
    assert p.feed("answer <|tool_calls_sec") == [{"content": "answer "}]
    assert p.feed("tion_begin|>") == [] and p.in_tool_section
    p2 = ToolCallStreamParser()
    assert p2.feed("a <|to") == [{"content": "a "}]
    assert p2.feed("day") == [{"content": "<|today"}]  # no marker starts with "<|today": released
    assert p2.feed("<|im_end|>") == [{"content": "<|im_end|>"}]  # not a tool-call marker


def accumulate(deltas):
    content, calls = "", {}
    for d in deltas:
        assert ("content" in d) != ("tool_calls" in d)
        if "content" in d:
            content += d["content"]
            continue
        (tc,) = d["tool_calls"]
        if "id" in tc:  # the header: id, type and name come first, alone
            assert tc["index"] == len(calls) and tc["type"] == "function" and tc["function"]["arguments"] == ""
            calls[tc["index"]] = [tc["id"], tc["function"]["name"], ""]
        else:
            assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
            calls[tc["index"]][2] += tc["function"]["arguments"]
    return content, [tuple(c) for c in calls.values()]


SAMPLES = [
    "I will call." + B + call(0, "get_weather", '{"city": "Paris"}') + call(1, "search", ' {"q": 1} ') + E,
    f"{B}\n{CB} functions.a:0 {AB}\n{{\n  \"x\": [1, 2]\n}}\n{CE}\n{E}done",
    f"<|tool_call_section_begin|>{CB}b:3{AB}{json.dumps(json.dumps({'k': 'v'}))}{CE}<|tool_call_section_end|>",
    f"{B}{CB}functions.bad.0{AB}{{oops{CE}{CB}functions.f:1{CE}{CB}functions.g:2{AB}{{}}",
    "a < b <| c <|tool <|im_end|> tail <",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_streaming_matches_parse_at_every_split(text):
    content, calls = parse(text)
    expected = (content, [(c.id, c.name, c.arguments) for c in calls])
    for cut in range(len(text) + 1):
        p = ToolCallStreamParser()
        deltas = p.feed(text[:cut]) + p.feed(text[cut:]) + p.finish()
        assert accumulate(deltas) == expected
        assert (p.content, p.calls) == (content, calls)
    p = ToolCallStreamParser()  # one character at a time
    assert accumulate([d for ch in text for d in p.feed(ch)] + p.finish()) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([B, E, CB, AB, CE, "<|tool_call_section_begin|>", "functions.f:0", "g:1", " ",
                                 "\n", '{"a": 1}', '"{\\"b\\": 2}"', "{", "}", "text", "<", "<|", "x"]),
                max_size=25).map("".join),
       st.lists(st.integers(0, 400), max_size=6))
def test_streaming_matches_parse_random(text, cuts):
    content, calls = parse(text)
    p = ToolCallStreamParser()
    bounds = [0, *sorted(c for c in cuts if c <= len(text)), len(text)]
    deltas = [d for a, b in zip(bounds, bounds[1:], strict=False) for d in p.feed(text[a:b])] + p.finish()
    assert accumulate(deltas) == (content, [(c.id, c.name, c.arguments) for c in calls])
    for marker in (B, E, CB, AB, CE):
        assert marker not in content


arguments = st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=8) | st.booleans(), max_size=3)
tool_calls = st.lists(st.tuples(st.sampled_from(["get_weather", "search", "a.b", "x-y"]), arguments), max_size=4)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=20).filter(lambda t: "<|" not in t), tool_calls)
def test_render_parse_round_trip(content, pairs):
    calls = [ToolCall(tool_call_id(n, i), n, json.dumps(a, ensure_ascii=False)) for i, (n, a) in enumerate(pairs)]
    assert parse(content + render(calls)) == (content, calls)
    as_openai = [{"id": c.id, "function": {"name": c.name, "arguments": json.loads(c.arguments)}} for c in calls]
    assert render(as_openai) == render(calls)


def test_render_matches_chat_template_and_token_stream(k2_tokenizer_dir):
    tok = Tokenizer.from_pretrained(k2_tokenizer_dir)
    calls = [{"id": "functions.get_weather:0", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
             {"id": "functions.search:1", "function": {"name": "search", "arguments": '{"q": "x"}'}}]
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ok", "tool_calls": calls}]
    prompt = tok.apply_chat_template(msgs[:1])
    full = tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert full == prompt + "ok" + render(calls) + "<|im_end|>"
    # token by token through the detokenizer, as the engine streams it
    ids = tok.encode("ok" + render(calls))
    assert tok.special_tokens[B] in ids
    p, d = ToolCallStreamParser(), IncrementalDetokenizer(tok)
    deltas = [x for i in ids for x in p.feed(d.push(i))] + p.feed(d.flush()) + p.finish()
    assert accumulate(deltas) == ("ok", [("functions.get_weather:0", "get_weather", '{"city": "Rome"}'),
                                         ("functions.search:1", "search", '{"q": "x"}')])


def test_render_rejects_bad_calls():
    assert render([]) == ""
    with pytest.raises(ValueError, match="does not name function"):
        render([ToolCall("functions.other:0", "f", "{}")])
    with pytest.raises(ValueError, match="malformed"):
        render([ToolCall("f:0", "f", "{", error="arguments are not valid JSON")])
    with pytest.raises(ValueError, match="marker text"):
        render([ToolCall("f:0", "f", '{"a": "<|tool_call_end|>"}')])
    with pytest.raises(ValueError, match="function.name"):
        render([{"function": {"arguments": "{}"}}])
    assert render([{"function": {"name": "f", "arguments": {}}}]) == f"{B}{CB}functions.f:0{AB}{{}}{CE}{E}"
