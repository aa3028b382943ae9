"""OpenAI legacy completions: POST /v1/completions, one prompt or a batch of them (strings or token-id lists).

As vLLM and OpenAI: choice `index` is prompt * n + sample; `echo` puts the prompt in front of each choice's text, and
with `logprobs` the prompt tokens' logprobs too (the first one null) with their text offsets; `logprobs: k` lists the
top k plus the sampled token in each `top_logprobs` entry (so `logprobs: 0` gives just the sampled one); a streamed
chunk carries the logprobs of the tokens whose text it holds.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from kimi_k2.engine import SamplingParams, TokenLogprob
from kimi_k2.server import openai_protocol as op
from kimi_k2.server.errors import APIError
from kimi_k2.server.generation import FinishEvent, Generation, Sample, TextEvent
from kimi_k2.server.openai_api import guarded, sampling, sse, token_text
from kimi_k2.server.openapi import GENERATION_ERRORS, OpenAIStreamEvent, RouteDoc, TextCompletion, document
from kimi_k2.server.state import ServerState, client_gone, collected, launch, parse_body, read_body, request_id

router = APIRouter()
document("post", "/v1/completions",
         RouteDoc("openai", op.CompletionRequest, TextCompletion, OpenAIStreamEvent, GENERATION_ERRORS))
MAX_PROMPTS = 64  # prompts per request


def prompt_list(st: ServerState, prompt: str | list) -> list[list[int]]:
    """`prompt` as token-id lists: a string, a list of strings, a list of ids, or a list of id lists."""
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        prompts: list = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt must not be an empty list", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"{len(prompts)} prompts given; at most {MAX_PROMPTS} per request", "prompt")
    out = []
    for i, p in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            st.check_prompt_chars(len(p), "prompt")
            ids = st.tokenizer.encode(p, allow_special=True)  # raw completions: markers in the text are tokens
        else:
            ids = list(p)
            bad = [t for t in ids if not 0 <= t < st.tokenizer.n_vocab]
            if bad:
                raise APIError(400, f"{where}: token id {bad[0]} is outside the vocabulary [0, "
                                    f"{st.tokenizer.n_vocab})", "prompt")
        if not ids:
            raise APIError(400, f"{where} must not be empty", "prompt")
        out.append(ids)
    return out


def prepare_completion(st: ServerState, raw: bytes) -> tuple[op.CompletionRequest, list[list[int]], SamplingParams]:
    body = parse_body(op.CompletionRequest, raw)
    st.check_model(body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported", "suffix")
    prompts = prompt_list(st, body.prompt)
    longest = max(prompts, key=len)
    max_tokens = st.max_tokens(len(longest), body.max_tokens if body.max_tokens else 16, prompt_param="prompt")
    return body, prompts, sampling(st, body, max_tokens, logprobs=body.logprobs)


@router.post("/v1/completions")
async def completions(request: Request):
    st: ServerState = request.app.state.k2
    with st.admission.waiting():
        deadline = st.deadline()
        body, prompts, params = await st.off_loop(prepare_completion, st, await read_body(request))
        rid = request_id("cmpl-")
        gens = [Generation(st.engine, st.tokenizer, st.compiler, p, params, None,
                           rid if len(prompts) == 1 else f"{rid}-{i}", deadline=deadline)
                for i, p in enumerate(prompts)]
        echo = [Echo(st.tokenizer.decode(p), p) for p in prompts] if body.echo else [None] * len(prompts)
        if body.echo and body.logprobs is not None:
            for e, p in zip(echo, prompts, strict=True):
                e.logprobs = await prompt_logprobs(st, p, body.logprobs)
        for gen in gens:
            await launch(st, gen)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = completion_stream(st, rid, gens, body, echo, include_usage)
        return StreamingResponse(guarded(st, gens, chunks), media_type="text/event-stream")
    choices = []
    for p, gen in enumerate(gens):
        samples = await collected(st, gen, request)
        if samples is None:
            for rest in gens[p + 1:]:
                st.engine.abort(rest.request_id)
            return client_gone(st)
        choices += [choice(st, p * params.n + j, s, echo[p], body.logprobs) for j, s in enumerate(samples)]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": body.model,
            "system_fingerprint": st.fingerprint, "choices": choices, "usage": usage(gens)}


class Echo:
    """The prompt part of an echoed choice: its text and (with logprobs) its tokens' logprobs."""

    def __init__(self, text: str, ids: list[int]):
        self.text, self.ids = text, ids
        self.logprobs: list[TokenLogprob | None] | None = None


async def prompt_logprobs(st: ServerState, ids: list[int], k: int) -> list[TokenLogprob | None]:
    try:
        return await st.engine.call(lambda engine: engine.prompt_logprobs(ids, k))
    except ValueError as e:
        raise APIError(400, str(e), "echo") from None


def usage(gens: list[Generation]) -> dict:
    prompt = sum(g.prompt_tokens for g in gens)
    done = sum(sum(g.completion_tokens) for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
            "prompt_tokens_details": {"cached_tokens": sum(g.cached_tokens for g in gens)}}


def choice(st: ServerState, index: int, s: Sample, echo: Echo | None, logprobs: int | None) -> dict:
    lps = None
    if logprobs is not None:
        prompt_part = echo.logprobs if echo is not None and echo.logprobs is not None else []
        lps = completion_logprobs(st, [*prompt_part, *s.logprobs], logprobs)
        if echo is not None:
            lps = first_token(st, echo, lps)
    return {"index": index, "text": (echo.text if echo else "") + s.text,
            "finish_reason": s.finish.reason if s.finish else "stop", "logprobs": lps}


def completion_logprobs(st: ServerState, lps: list[TokenLogprob | None], k: int, offset: int = 0) -> dict:
    """OpenAI's legacy logprobs object; a None entry is the first prompt token of an echo (no logprob)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for lp in lps:
        offsets.append(offset)
        if lp is None:  # only the first prompt token: its text is known from the echo
            tokens.append(None)
            token_lps.append(None)
            tops.append(None)
            continue
        text = token_text(st, lp.token_id)[0]
        tokens.append(text)
        offset += len(text)
        token_lps.append(lp.logprob)
        top = {token_text(st, tid)[0]: v for tid, v in lp.top[:k]}
        top.setdefault(text, lp.logprob)  # vLLM: the sampled token is always listed
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def first_token(st: ServerState, echo: Echo, out: dict) -> dict:
    """Fill in the first prompt token of an echo (it has a text and an offset, but no logprob)."""
    if echo.ids and out["tokens"] and out["tokens"][0] is None:
        text = token_text(st, echo.ids[0])[0]
        out["tokens"][0] = text
        out["text_offset"] = [0] + [o + len(text) for o in out["text_offset"][1:]]
    return out


async def completion_stream(st: ServerState, rid: str, gens: list[Generation], body: op.CompletionRequest,
                            echo: list[Echo | None], include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())
    n, k = gens[0].params.n, body.logprobs
    base = {"id": rid, "object": "text_completion", "created": created, "model": body.model,
            "system_fingerprint": st.fingerprint}

    def chunk(index: int, text: str, finish: str | None = None, logprobs: dict | None = None) -> str:
        return sse({**base, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
                    **({"usage": None} if include_usage else {})})

    for p, gen in enumerate(gens):
        offsets = [0] * n  # characters of each choice's text so far (for text_offset)
        if echo[p] is not None:
            for j in range(n):
                e = echo[p]
                lps = first_token(st, e, completion_logprobs(st, e.logprobs, k)) if e.logprobs is not None else None
                offsets[j] = len(e.text)
                yield chunk(p * n + j, e.text, logprobs=lps)
        async for ev in gen.events():
            index = p * n + ev.index
            lps = completion_logprobs(st, ev.logprobs, k, offsets[ev.index]) if k is not None and ev.logprobs \
                else None
            if isinstance(ev, TextEvent):
                offsets[ev.index] += len(ev.text)
                yield chunk(index, ev.text, logprobs=lps)
            elif isinstance(ev, FinishEvent):
                yield chunk(index, "", finish=ev.reason, logprobs=lps)
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage(gens)})
    yield sse("[DONE]")
