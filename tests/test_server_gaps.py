"""The OpenAI-protocol gaps of issue 17, each checked against a real loopback server with the official `openai`
client (or raw HTTP where the wire shape itself is the point): batched /v1/completions prompts, logprobs in the chunk
of their text, echo with prompt logprobs and offsets, `logprobs: 0`, GET /v1/models/{id}, logit_bias, an empty
tools array and an int64-overflowing seed rejected, JSON-schema type "int", `"usage": null` on non-final chunks,
`system_fingerprint`, no-tools requests that can never open a tool-call section, and vLLM's `ignore_eos` and
`stop_token_ids` extensions."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pydantic
import pytest
import torch
from server_fixtures import ALIASES, API_KEY, MODEL

ASK = [{"role": "user", "content": "What's the weather like in Beijing today?"}]
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0)


def sse_chunks(url: str, path: str, body: dict) -> list[dict]:
    """The JSON chunks of a streamed response (raw, so that absent and null fields differ), [DONE] checked."""
    with httpx.stream("POST", url + path, json=body, headers=HEADERS, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_completions_take_a_list_of_prompts(client):
    prompts = ["The cat", "A dog runs", "Weather"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, temperature=0, n=2)
    assert [c.index for c in r.choices] == list(range(6))
    for p, prompt in enumerate(prompts):  # prompt p's samples are choices 2p, 2p + 1 (greedy: equal)
        one = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
        assert r.choices[2 * p].text == r.choices[2 * p + 1].text == one.choices[0].text
    assert r.usage.completion_tokens == 18
    ids = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=2, temperature=0)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 5
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model=MODEL, prompt=[], max_tokens=2)


def test_streamed_completion_logprobs_come_with_their_text(server):
    chunks = sse_chunks(server[0], "/v1/completions", {"model": MODEL, "prompt": "The cat", "max_tokens": 8,
                                                       "temperature": 0, "logprobs": 2, "stream": True})
    n_tokens, offset = 0, 0
    for c in chunks:
        (ch,) = c["choices"]
        lp = ch["logprobs"]
        if lp is None:
            assert ch["text"] == ""  # no text without its tokens
            continue
        if not any("\ufffd" in t for t in lp["tokens"]):  # whole UTF-8 tokens: the chunk's text is theirs
            assert "".join(lp["tokens"]) == ch["text"]
        assert lp["text_offset"][0] == offset
        offset += len(ch["text"])
        n_tokens += len(lp["tokens"])
    assert n_tokens == 8


def test_streamed_chat_logprobs_come_with_their_content(server, client):
    chunks = sse_chunks(server[0], "/v1/chat/completions", {
        "model": MODEL, "messages": ASK, "max_tokens": 10, "temperature": 0, "logprobs": True, "top_logprobs": 2,
        "stream": True, "stream_options": {"include_usage": True}})
    entries = 0
    for c in chunks[:-1]:
        (ch,) = c["choices"]
        if ch["logprobs"] is not None:
            assert ch["delta"].get("content") or ch["finish_reason"], "logprobs never travel in a chunk of their own"
            entries += len(ch["logprobs"]["content"])
    assert entries == chunks[-1]["usage"]["completion_tokens"] == 10
    full = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=10, temperature=0, logprobs=True,
                                          top_logprobs=2)
    assert len(full.choices[0].logprobs.content) == 10


def test_echo_with_logprobs_covers_the_prompt(server, client):
    st = server[1]
    prompt = "The cat sat on"
    ids = st.tokenizer.encode(prompt)
    r = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=3, temperature=0)
    (ch,) = r.choices
    lp = ch.logprobs
    assert ch.text.startswith(prompt)
    assert len(lp.tokens) == len(ids) + 3
    assert "".join(lp.tokens[:len(ids)]) == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    model = st.engine.engine.runner.model  # the prompt's logprobs, computed here from the model itself
    with torch.inference_mode():
        want = model(torch.tensor([ids])).float().log_softmax(-1)[0]
    for i in range(1, len(ids)):
        assert math.isclose(lp.token_logprobs[i], want[i - 1, ids[i]].item(), abs_tol=1e-3)
        assert len(lp.top_logprobs[i]) >= 2
    streamed = sse_chunks(server[0], "/v1/completions", {"model": MODEL, "prompt": prompt, "echo": True,
                                                         "logprobs": 2, "max_tokens": 3, "temperature": 0,
                                                         "stream": True})
    first = streamed[0]["choices"][0]
    assert first["text"] == prompt and first["logprobs"]["tokens"][:len(ids)] == lp.tokens[:len(ids)]


def test_logprobs_zero_lists_the_sampled_token(client):
    r = client.completions.create(model=MODEL, prompt="The cat", logprobs=0, max_tokens=4, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.top_logprobs) == 4
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top == {token: value}


def test_models_retrieve(client):
    for name in ALIASES:
        m = client.models.retrieve(name)
        assert m.id == name and m.object == "model" and m.root == ALIASES[0]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4o")


def test_logit_bias_is_honoured(server, client):
    st = server[1]
    token = st.tokenizer.encode("P")[0]
    r = client.completions.create(model=MODEL, prompt="The cat", max_tokens=5, temperature=1.0, seed=3,
                                  logit_bias={str(token): 100}, logprobs=0)
    assert r.choices[0].text == "P" * 5
    base = client.completions.create(model=MODEL, prompt="The cat", max_tokens=1, temperature=0, logprobs=0)
    banned = st.tokenizer.encode(base.choices[0].text)[0]
    other = client.completions.create(model=MODEL, prompt="The cat", max_tokens=1, temperature=0, logprobs=0,
                                      logit_bias={str(banned): -100})
    assert other.choices[0].text != base.choices[0].text
    for bad in ({"x": 1}, {str(st.tokenizer.n_vocab): 1}, {"5": 101}):
        with pytest.raises(openai.BadRequestError, match="logit_bias"):
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1, logit_bias=bad)


def test_empty_tools_and_seed_overflow_are_400(client):
    with pytest.raises(openai.BadRequestError, match="tools must not be an empty array"):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="seed"):
        client.chat.completions.create(model=MODEL, messages=ASK, seed=2**63, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="seed"):
        client.completions.create(model=MODEL, prompt="x", seed=-(2**63) - 1, max_tokens=2)
    ok = client.chat.completions.create(model=MODEL, messages=ASK, seed=2**63 - 1, max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_json_schema_type_int_is_integer(client):
    schema = {"type": "object", "required": ["n"], "additionalProperties": False,
              "properties": {"n": {"type": "int", "minimum": 0, "maximum": 9}}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0.8, seed=1, response_format={
        "type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    value = json.loads(r.choices[0].message.content)
    assert isinstance(value["n"], int) and 0 <= value["n"] <= 9
    tool = {"type": "function", "function": {"name": "pick", "parameters": schema}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[tool], tool_choice="required", seed=2,
                                       parallel_tool_calls=False)
    (call,) = r.choices[0].message.tool_calls
    assert isinstance(json.loads(call.function.arguments)["n"], int)


class Weather(pydantic.BaseModel):
    city: str
    sunny: bool


def test_structured_outputs_parse(client):
    r = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Weather, temperature=0.7, seed=5,
                                      max_tokens=200)
    msg = r.choices[0].message
    assert isinstance(msg.parsed, Weather) and json.loads(msg.content) == msg.parsed.model_dump()


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": ASK}),
    ("/v1/completions", {"prompt": "The cat"}),
])
def test_usage_null_on_non_final_chunks_and_fingerprint(server, path, body):
    chunks = sse_chunks(server[0], path, {"model": MODEL, "max_tokens": 4, "temperature": 0, "stream": True,
                                          "stream_options": {"include_usage": True}, **body})
    *head, last = chunks
    assert head and all("usage" in c and c["usage"] is None for c in head)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4
    fingerprints = {c["system_fingerprint"] for c in chunks}
    assert len(fingerprints) == 1 and fingerprints.pop().startswith("fp_")
    plain = sse_chunks(server[0], path, {"model": MODEL, "max_tokens": 2, "stream": True, **body})
    assert all("usage" not in c for c in plain)  # without include_usage, no usage field at all (as OpenAI)


def test_system_fingerprint_on_responses(client):
    a = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
    b = client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert a.system_fingerprint == b.system_fingerprint and a.system_fingerprint.startswith("fp_")


def test_no_tools_request_never_opens_a_tool_call_section(server, client):
    """Pushed with +100 towards the section marker (which would otherwise win every time, as the logit_bias test
    shows for a plain token), a request without tools still gets text and never the marker."""
    st = server[1]
    marker = st.tokenizer.token_to_id("<|tool_calls_section_begin|>")
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6, temperature=0, logprobs=True,
                                       logit_bias={str(marker): 100})
    msg = r.choices[0].message
    assert msg.content and not msg.tool_calls
    assert all(lp.token != "<|tool_calls_section_begin|>" for lp in r.choices[0].logprobs.content)
    raw = client.completions.create(model=MODEL, prompt="x", max_tokens=1, temperature=0,
                                    logit_bias={str(marker): 100}, logprobs=0)
    assert raw.choices[0].logprobs.tokens == ["<|tool_calls_section_begin|>"]  # raw completions are not masked


def test_vllm_ignore_eos_and_stop_token_ids(server, client):
    st = server[1]
    eos = min(st.engine.engine.eos_token_ids)
    to_eos = {"logit_bias": {str(eos): 100}}  # every greedy step picks EOS
    ends = client.completions.create(model=MODEL, prompt="The cat", max_tokens=6, temperature=0, extra_body=to_eos)
    assert ends.choices[0].finish_reason == "stop" and ends.usage.completion_tokens == 1
    goes_on = client.completions.create(model=MODEL, prompt="The cat", max_tokens=6, temperature=0,
                                        extra_body={**to_eos, "ignore_eos": True})
    assert goes_on.choices[0].finish_reason == "length" and goes_on.usage.completion_tokens == 6
    base = client.completions.create(model=MODEL, prompt="The cat", max_tokens=6, temperature=0, logprobs=0)
    assert base.choices[0].finish_reason == "length"
    second = st.tokenizer.encode(base.choices[0].logprobs.tokens[1])[0]
    cut = client.completions.create(model=MODEL, prompt="The cat", max_tokens=6, temperature=0,
                                    extra_body={"stop_token_ids": [second]})
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens == 2
    assert cut.choices[0].text == base.choices[0].logprobs.tokens[0]
    with pytest.raises(openai.BadRequestError, match="stop_token_ids"):
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2,
                                       extra_body={"stop_token_ids": [st.tokenizer.n_vocab]})
