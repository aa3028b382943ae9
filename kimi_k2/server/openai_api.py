"""OpenAI-compatible routes: /v1/chat/completions, /v1/models (and /v1/models/{id}); the pieces /v1/completions and
/v1/responses share.

A generation route holds a queue place (429 when the queue is full) from arrival to its first token; its body is
parsed, rendered, tokenized and its grammar compiled on the preparation threads (`prepare_*`), off the event loop.
As vLLM: a request without tools can never open a tool-call section (the markers are banned), `logit_bias` is
applied, logprobs come in the chunk of the text they belong to, every response and chunk carries
`system_fingerprint`, and under `stream_options.include_usage` every chunk but the last has `"usage": null`. With
`--reasoning-parser kimi_k2`, the reasoning is `reasoning_content` (message and deltas), never in `content`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from kimi_k2.engine import SamplingParams, TokenLogprob
from kimi_k2.server import conversation
from kimi_k2.server import openai_protocol as op
from kimi_k2.server.errors import APIError, engine_failure, openai_error
from kimi_k2.server.generation import (
    Event,
    FinishEvent,
    Generation,
    ReasoningEvent,
    Sample,
    TextEvent,
    ToolEvent,
)
from kimi_k2.server.grammar import ToolPlan, lark_grammar
from kimi_k2.server.openapi import (
    GENERATION_ERRORS,
    ChatCompletion,
    ModelCard,
    ModelList,
    OpenAIStreamEvent,
    RouteDoc,
    document,
)
from kimi_k2.server.state import (
    ServerState,
    account,
    client_gone,
    collected,
    parse_body,
    start_generation,
)

router = APIRouter()
document("post", "/v1/chat/completions",
         RouteDoc("openai", op.ChatCompletionRequest, ChatCompletion, OpenAIStreamEvent, GENERATION_ERRORS))
document("get", "/v1/models", RouteDoc("openai", ok=ModelList, errors=(401,)))
document("get", "/v1/models/{model_id}", RouteDoc("openai", ok=ModelCard, errors=(401, 404)))


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def sampling(st: ServerState, body: op.SamplingFields, max_tokens: int, **extra) -> SamplingParams:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    st.check_stop(stop, "stop")
    t = body.temperature
    return SamplingParams(max_tokens=max_tokens, temperature=1.0 if t is None else t, top_p=body.top_p or 1.0,
                          top_k=body.top_k or 0, min_p=body.min_p or 0.0,
                          presence_penalty=body.presence_penalty or 0.0,
                          frequency_penalty=body.frequency_penalty or 0.0, seed=body.seed, n=body.n or 1,
                          stop=stop, logit_bias=st.logit_bias(body.logit_bias),
                          stop_token_ids=st.token_ids(body.stop_token_ids, "stop_token_ids"),
                          ignore_eos=bool(body.ignore_eos), **extra)


def usage(gen: Generation) -> dict:
    done = sum(gen.completion_tokens)
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": done, "total_tokens": gen.prompt_tokens + done,
            "prompt_tokens_details": {"cached_tokens": gen.cached_tokens}}


def token_text(st: ServerState, token_id: int) -> tuple[str, list[int]]:
    b = st.tokenizer.id_to_token_bytes(token_id)
    return b.decode("utf-8", errors="replace"), list(b)


def chat_logprobs(st: ServerState, lps: list[TokenLogprob]) -> dict:
    out = []
    for lp in lps:
        tok, b = token_text(st, lp.token_id)
        top = []
        for tid, v in lp.top:
            t, tb = token_text(st, tid)
            top.append({"token": t, "logprob": v, "bytes": tb})
        out.append({"token": tok, "logprob": lp.logprob, "bytes": b, "top_logprobs": top})
    return {"content": out}


def tool_call_json(c) -> dict:
    return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


def model_card(st: ServerState, name: str) -> dict:
    return {"id": name, "object": "model", "created": st.created, "owned_by": "kimi-k2", "root": st.model_names[0],
            "max_model_len": st.max_model_len}


@router.get("/v1/models")
async def models(request: Request) -> dict:
    st: ServerState = request.app.state.k2
    return {"object": "list", "data": [model_card(st, n) for n in st.model_names]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> dict:
    st: ServerState = request.app.state.k2
    st.check_model(model_id)
    return model_card(st, model_id)


def prepare_chat(st: ServerState, raw: bytes) -> tuple[op.ChatCompletionRequest, list[int], ToolPlan | None,
                                                      SamplingParams]:
    body = parse_body(op.ChatCompletionRequest, raw)
    st.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
    lim = st.limits
    try:
        messages = conversation.openai_messages(body, st.reasoning)
        st.check_prompt_chars(sum(len(m["content"]) + len(m.get("reasoning_content", "")) for m in messages),
                              "messages")
        tools, plan, text_schema = conversation.openai_tools(body, messages, st.compiler, lim.max_tools,
                                                             lim.max_schema_bytes)
        prompt = st.encode_chat(messages, tools)
        constraint = st.compiler.constraint(lark_grammar(plan, text_schema, st.reasoning))
    except ValueError as e:
        raise APIError(400, str(e)) from None
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = st.max_tokens(len(prompt), body.max_completion_tokens or body.max_tokens, param)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling(st, body, max_tokens, logprobs=logprobs, constraint=constraint)
    if plan is not None and plan.mode == "required":
        params.stop = []  # the whole reply is one tool-call section: stop strings, which cut text, do not apply
    return body, prompt, plan, params


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    st: ServerState = request.app.state.k2
    body, gen = await start_generation(st, request, prepare_chat, "chatcmpl-")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(chat_stream(st, gen, body.model, include_usage, bool(body.logprobs)),
                                 media_type="text/event-stream")
    samples = await collected(st, gen, request)
    if samples is None:
        return client_gone(st)
    return {"id": gen.request_id, "object": "chat.completion", "created": int(time.time()), "model": body.model,
            "system_fingerprint": st.fingerprint,
            "choices": [chat_choice(st, i, s, body.logprobs) for i, s in enumerate(samples)], "usage": usage(gen)}


def chat_choice(st: ServerState, i: int, s: Sample, logprobs: bool | None) -> dict:
    message: dict = {"role": "assistant", "content": s.text or (None if s.calls or s.reasoning else "")}
    if s.reasoning is not None:
        message["reasoning_content"] = s.reasoning
    if s.calls:
        message["tool_calls"] = [tool_call_json(c) for c in s.calls]
    return {"index": i, "message": message, "logprobs": chat_logprobs(st, s.logprobs) if logprobs else None,
            "finish_reason": s.finish.reason if s.finish else "stop"}


async def guarded(st: ServerState, gens: list[Generation], chunks) -> AsyncIterator[str]:
    """Ends the stream with an error event instead of a broken connection; a client gone aborts the requests."""
    finished = False
    try:
        async for c in chunks:
            yield c
        finished = True
    except Exception as e:  # the engine failed or timed out mid-stream: tell the client in the stream itself
        yield sse(openai_error(engine_failure(e)))
        finished = True
    finally:
        if not finished:
            st.metrics.aborted += 1
            for gen in gens:
                st.engine.abort(gen.request_id)
        await chunks.aclose()  # closes the engine streams too
        for gen in gens:
            account(st, gen)


def chat_delta(ev: Event) -> dict:
    """The `delta` of a chat chunk for one event (empty for the finish event)."""
    if isinstance(ev, TextEvent):
        return {"content": ev.text}
    if isinstance(ev, ReasoningEvent):
        return {"reasoning_content": ev.text}
    if isinstance(ev, ToolEvent):
        call: dict = {"index": ev.call, "function": {"arguments": ev.arguments}}
        if ev.id is not None:
            call.update(id=ev.id, type="function")
            call["function"]["name"] = ev.name
        return {"tool_calls": [call]}
    return {}


def chat_stream(st: ServerState, gen: Generation, model: str, include_usage: bool,
                logprobs: bool) -> AsyncIterator[str]:
    created = int(time.time())
    base = {"id": gen.request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": st.fingerprint}

    def chunk(choices: list[dict], **extra) -> str:
        return sse({**base, "choices": choices, **({"usage": None} if include_usage else {}), **extra})

    async def chunks() -> AsyncIterator[str]:
        for i in range(gen.params.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for ev in gen.events():
            lps = chat_logprobs(st, ev.logprobs) if logprobs and ev.logprobs else None
            finish = ev.reason if isinstance(ev, FinishEvent) else None
            yield chunk([{"index": ev.index, "delta": chat_delta(ev), "logprobs": lps, "finish_reason": finish}])
        if include_usage:
            yield chunk([], usage=usage(gen))
        yield sse("[DONE]")

    return guarded(st, [gen], chunks())
