"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

A generation route holds a queue place (429 when the queue is full) from arrival to its first token; its body is
parsed, rendered, tokenized and its grammar compiled on the preparation threads (`prepare_*`), off the event loop.
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
    FinishEvent,
    Generation,
    LogprobEvent,
    Sample,
    TextEvent,
    ToolEvent,
)
from kimi_k2.server.grammar import ToolPlan, lark_grammar
from kimi_k2.server.openapi import (
    GENERATION_ERRORS,
    ChatCompletion,
    ModelList,
    OpenAIStreamEvent,
    RouteDoc,
    TextCompletion,
    document,
)
from kimi_k2.server.state import (
    ServerState,
    account,
    client_gone,
    collected,
    launch,
    parse_body,
    read_body,
    request_id,
)

router = APIRouter()
document("post", "/v1/chat/completions",
         RouteDoc("openai", op.ChatCompletionRequest, ChatCompletion, OpenAIStreamEvent, GENERATION_ERRORS))
document("post", "/v1/completions",
         RouteDoc("openai", op.CompletionRequest, TextCompletion, OpenAIStreamEvent, GENERATION_ERRORS))
document("get", "/v1/models", RouteDoc("openai", ok=ModelList, errors=(401,)))


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
                          stop=stop, **extra)


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


@router.get("/v1/models")
async def models(request: Request) -> dict:
    st: ServerState = request.app.state.k2
    return {"object": "list", "data": [{"id": n, "object": "model", "created": st.created, "owned_by": "kimi-k2",
                                        "max_model_len": st.max_model_len} for n in st.model_names]}


def prepare_chat(st: ServerState, raw: bytes) -> tuple[op.ChatCompletionRequest, list[int], ToolPlan | None,
                                                      SamplingParams]:
    body = parse_body(op.ChatCompletionRequest, raw)
    st.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
    lim = st.limits
    try:
        messages = conversation.openai_messages(body)
        st.check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
        tools, plan, text_schema = conversation.openai_tools(body, messages, st.compiler, lim.max_tools,
                                                             lim.max_schema_bytes)
        prompt = st.encode_chat(messages, tools)
        constraint = st.compiler.constraint(lark_grammar(plan, text_schema))
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
    with st.admission.waiting():
        deadline = st.deadline()
        body, prompt, plan, params = await st.off_loop(prepare_chat, st, await read_body(request))
        gen = Generation(st.engine, st.tokenizer, st.compiler, prompt, params, plan, request_id("chatcmpl-"),
                         st.hidden, deadline)
        await launch(st, gen)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(chat_stream(st, gen, body.model, include_usage), media_type="text/event-stream")
    samples = await collected(st, gen, request)
    if samples is None:
        return client_gone(st)
    return {"id": gen.request_id, "object": "chat.completion", "created": int(time.time()), "model": body.model,
            "choices": [chat_choice(st, i, s, body.logprobs) for i, s in enumerate(samples)], "usage": usage(gen)}


def chat_choice(st: ServerState, i: int, s: Sample, logprobs: bool | None) -> dict:
    message: dict = {"role": "assistant", "content": s.text or (None if s.calls else "")}
    if s.calls:
        message["tool_calls"] = [tool_call_json(c) for c in s.calls]
    return {"index": i, "message": message, "logprobs": chat_logprobs(st, s.logprobs) if logprobs else None,
            "finish_reason": s.finish.reason if s.finish else "stop"}


async def guarded(st: ServerState, gen: Generation, chunks) -> AsyncIterator[str]:
    """Ends the stream with an error event instead of a broken connection; a client gone aborts the request."""
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
            st.engine.abort(gen.request_id)
        await chunks.aclose()  # closes the engine stream too
        account(st, gen)


def chat_stream(st: ServerState, gen: Generation, model: str, include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> str:
        return sse({"id": gen.request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

    async def chunks() -> AsyncIterator[str]:
        for i in range(gen.params.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for ev in gen.events():
            if isinstance(ev, TextEvent):
                yield chunk(ev.index, {"content": ev.text})
            elif isinstance(ev, ToolEvent):
                call: dict = {"index": ev.call, "function": {"arguments": ev.arguments}}
                if ev.id is not None:
                    call.update(id=ev.id, type="function")
                    call["function"]["name"] = ev.name
                yield chunk(ev.index, {"tool_calls": [call]})
            elif isinstance(ev, LogprobEvent):
                yield chunk(ev.index, {}, logprobs=chat_logprobs(st, ev.logprobs))
            elif isinstance(ev, FinishEvent):
                yield chunk(ev.index, {}, finish=ev.reason)
        if include_usage:
            yield sse({"id": gen.request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": usage(gen)})
        yield sse("[DONE]")

    return guarded(st, gen, chunks())


def prompt_ids(st: ServerState, prompt: str | list) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        st.check_prompt_chars(len(prompt), "prompt")
        ids = st.tokenizer.encode(prompt, allow_special=True)  # raw completions: markers in the text are tokens
    elif all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < st.tokenizer.n_vocab]
        if bad:
            raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {st.tokenizer.n_vocab})",
                           "prompt")
    else:
        raise APIError(400, "only one prompt per request is supported", "prompt")
    if not ids:
        raise APIError(400, "prompt must not be empty", "prompt")
    return ids


def prepare_completion(st: ServerState, raw: bytes) -> tuple[op.CompletionRequest, list[int], SamplingParams, str]:
    body = parse_body(op.CompletionRequest, raw)
    st.check_model(body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported", "suffix")
    prompt = prompt_ids(st, body.prompt)
    max_tokens = st.max_tokens(len(prompt), body.max_tokens if body.max_tokens else 16, prompt_param="prompt")
    params = sampling(st, body, max_tokens, logprobs=body.logprobs)
    return body, prompt, params, st.tokenizer.decode(prompt) if body.echo else ""


@router.post("/v1/completions")
async def completions(request: Request):
    st: ServerState = request.app.state.k2
    with st.admission.waiting():
        deadline = st.deadline()
        body, prompt, params, echo = await st.off_loop(prepare_completion, st, await read_body(request))
        gen = Generation(st.engine, st.tokenizer, st.compiler, prompt, params, None, request_id("cmpl-"),
                         deadline=deadline)
        await launch(st, gen)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(guarded(st, gen, completion_stream(st, gen, body.model, echo, include_usage)),
                                 media_type="text/event-stream")
    samples = await collected(st, gen, request)
    if samples is None:
        return client_gone(st)
    choices = [{"index": i, "text": echo + s.text, "finish_reason": s.finish.reason if s.finish else "stop",
                "logprobs": completion_logprobs(st, s.logprobs) if body.logprobs is not None else None}
               for i, s in enumerate(samples)]
    return {"id": gen.request_id, "object": "text_completion", "created": int(time.time()), "model": body.model,
            "choices": choices, "usage": usage(gen)}


def completion_logprobs(st: ServerState, lps: list[TokenLogprob]) -> dict:
    tokens = [token_text(st, lp.token_id)[0] for lp in lps]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{token_text(st, tid)[0]: v for tid, v in lp.top} for lp in lps], "text_offset": offsets}


async def completion_stream(st: ServerState, gen: Generation, model: str, echo: str,
                            include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(index: int, text: str, finish: str | None = None, logprobs: dict | None = None) -> str:
        return sse({"id": gen.request_id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

    if echo:
        for i in range(gen.params.n):
            yield chunk(i, echo)
    async for ev in gen.events():
        if isinstance(ev, TextEvent):
            yield chunk(ev.index, ev.text)
        elif isinstance(ev, LogprobEvent):
            yield chunk(ev.index, "", logprobs=completion_logprobs(st, ev.logprobs))
        elif isinstance(ev, FinishEvent):
            yield chunk(ev.index, "", finish=ev.reason)
    if include_usage:
        yield sse({"id": gen.request_id, "object": "text_completion", "created": created, "model": model,
                   "choices": [], "usage": usage(gen)})
    yield sse("[DONE]")
