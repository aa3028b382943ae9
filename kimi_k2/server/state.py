"""What every route needs: the engine, the tokenizer, grammar compiler, served names, limits, metrics, checks."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from fastapi import Request, Response
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from kimi_k2 import __version__
from kimi_k2.engine.async_engine import EngineOverloadedError
from kimi_k2.reasoning import THINK_BEGIN, THINK_END
from kimi_k2.server.errors import APIError, engine_failure, pydantic_message
from kimi_k2.server.generation import Generation, Sample, collect_unless_gone
from kimi_k2.server.grammar import GrammarCompiler
from kimi_k2.server.limits import ServerLimits
from kimi_k2.toolcalls import MARKERS

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
PREP_THREADS = 4  # request preparation (JSON parsing, chat template, tokenization, grammar compilation)


class Admission:
    """Requests admitted but not generating yet (being prepared, or waiting for the engine), at most `limit`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.queued = 0

    @contextmanager
    def waiting(self):
        """Holds a queue place for the block (until the request's first token); 429 + Retry-After when full."""
        if self.queued >= self.limit:
            raise APIError(429, f"the server is busy: {self.queued} requests are already queued (the limit is "
                                f"{self.limit}); retry after 1 second", code="queue_full", headers={"Retry-After": "1"})
        self.queued += 1
        try:
            yield
        finally:
            self.queued -= 1


class Metrics:
    def __init__(self):
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.aborted = 0

    def render(self, stats: dict) -> str:
        """Prometheus text exposition format 0.0.4."""
        lines = ["# TYPE kimi_k2_requests_total counter"]
        for (path, status), n in sorted(self.requests.items()):
            lines.append(f'kimi_k2_requests_total{{path="{path}",status="{status}"}} {n}')
        for name, value in (("prompt_tokens_total", self.prompt_tokens),
                            ("generation_tokens_total", self.generation_tokens),
                            ("aborted_requests_total", self.aborted),
                            ("time_to_first_token_seconds_sum", self.ttft_sum),
                            ("time_to_first_token_seconds_count", self.ttft_count)):
            lines += [f"# TYPE kimi_k2_{name} counter", f"kimi_k2_{name} {value}"]
        for key, value in sorted(stats.items()):
            if isinstance(value, bool | int | float):
                lines += [f"# TYPE kimi_k2_engine_{key} gauge", f"kimi_k2_engine_{key} {float(value)}"]
        return "\n".join(lines) + "\n"


class ServerState:
    def __init__(self, engine, tokenizer, model_names: list[str], vocab_size: int, api_key: str | None = None,
                 default_max_tokens: int | None = None, limits: ServerLimits | None = None,
                 public_metrics: bool = False, reasoning: bool = False):
        """`default_max_tokens`: completion budget when a request sets none (None: the rest of the context).
        `api_key`: required on every API route and, unless `public_metrics`, on /metrics (None: no key).
        `reasoning`: split `<think>` reasoning from the content (`--reasoning-parser kimi_k2`, for K2-Thinking):
        OpenAI `reasoning_content`, Anthropic `thinking` blocks, Responses reasoning items."""
        if api_key is not None and not api_key:
            raise ValueError("api_key must not be empty (pass None to serve without a key)")
        self.engine = engine
        self.default_max_tokens = default_max_tokens
        self.tokenizer = tokenizer
        self.model_names = model_names
        self.api_key = api_key
        self.public_metrics = public_metrics
        self.limits = limits or ServerLimits()
        self.admission = Admission(self.limits.max_queued_requests)
        self.prep = ThreadPoolExecutor(PREP_THREADS, thread_name_prefix="kimi-k2-prep")
        self.compiler = GrammarCompiler(tokenizer, vocab_size)
        # a prompt of C characters has at least C / max_token_chars tokens (special tokens count by their text)
        self.max_token_chars = max(len(tokenizer.id_to_token_bytes(i)) for i in range(tokenizer.n_vocab))
        # chat replies drop `special: true` tokens, as Hugging Face's skip_special_tokens (tool-call markers stay,
        # and so do <think> / </think> whatever a tokenizer_config says: the reasoning parser reads them)
        self.hidden = re.compile("|".join(re.escape(t) for t, i in tokenizer.special_tokens.items()
                                          if i in tokenizer.skippable_ids and t not in (THINK_BEGIN, THINK_END)))
        self.reasoning = reasoning
        # a request with no tools can never open a tool-call section: these ids are banned from its output
        self.tool_marker_ids = sorted(tokenizer.special_tokens[m] for m in MARKERS if m in tokenizer.special_tokens)
        # names this server's build: the model's shape and tokenizer, the package version (OpenAI `system_fingerprint`)
        basis = f"{__version__}|{vocab_size}|{tokenizer.n_vocab}|{model_names[0] if model_names else ''}|{reasoning}"
        self.fingerprint = "fp_" + hashlib.sha256(basis.encode()).hexdigest()[:10]
        self.metrics = Metrics()
        self.created = int(time.time())

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_prompt_tokens(self) -> int:
        return min(self.max_model_len - 1, self.limits.max_prompt_tokens or self.max_model_len)

    async def off_loop(self, fn: Callable[..., T], *args) -> T:
        """Run CPU-heavy request work on the preparation threads, so the event loop keeps answering."""
        return await asyncio.get_running_loop().run_in_executor(self.prep, fn, *args)

    def deadline(self) -> float | None:
        t = self.limits.request_timeout_s
        return None if t is None else time.monotonic() + t

    def check_prompt_chars(self, chars: int, param: str) -> None:
        """400 before tokenizing when `chars` characters of prompt text alone prove the prompt too long."""
        at_least = -(-chars // self.max_token_chars)
        if at_least > self.max_prompt_tokens:
            raise self.prompt_too_long(f"at least {at_least} tokens ({chars} characters, at most "
                                       f"{self.max_token_chars} per token)", param)

    def prompt_too_long(self, size: str, param: str) -> APIError:
        if self.max_prompt_tokens == self.max_model_len - 1:
            limit = f"this model's context is {self.max_model_len} tokens (at least 1 must be left to generate)"
        else:
            limit = f"this server allows at most {self.max_prompt_tokens} prompt tokens (--max-prompt-tokens)"
        return APIError(400, f"the prompt is {size}, but {limit}", param, "context_length_exceeded")

    def check_stop(self, stop: list[str], param: str) -> None:
        lim = self.limits
        if len(stop) > lim.max_stop_sequences:
            raise APIError(400, f"{param} has {len(stop)} entries; at most {lim.max_stop_sequences} are allowed",
                           param)
        for i, s in enumerate(stop):
            if not s:
                raise APIError(400, f"{param}[{i}] must not be an empty string", param)
            if len(s) > lim.max_stop_chars:
                raise APIError(400, f"{param}[{i}] is {len(s)} characters long; at most {lim.max_stop_chars} are "
                                    "allowed", param)

    def token_ids(self, raw: list[int] | None, param: str) -> list[int]:
        """A list of token ids checked against this tokenizer's vocabulary."""
        for token in raw or []:
            if not 0 <= token < self.tokenizer.n_vocab:
                vocab = self.tokenizer.n_vocab
                raise APIError(400, f"{param}: token id {token} is outside the vocabulary [0, {vocab})", param)
        return list(raw or [])

    def logit_bias(self, raw: dict[str, float] | None, param: str = "logit_bias") -> dict[int, float]:
        """OpenAI's logit_bias (token id -> bias in [-100, 100]) checked against this tokenizer's ids."""
        out: dict[int, float] = {}
        for key, value in (raw or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise APIError(400, f"{param}: key {key!r} is not a token id", param) from None
            if not 0 <= token < self.tokenizer.n_vocab:
                raise APIError(400, f"{param}: token id {token} is outside the vocabulary [0, "
                                    f"{self.tokenizer.n_vocab})", param)
            if not -100 <= value <= 100:
                raise APIError(400, f"{param}: the bias of token {token} is {value}; it must be in [-100, 100]", param)
            out[token] = float(value)
        return out

    def without_tool_markers(self, bias: dict[int, float]) -> dict[int, float]:
        """`bias` plus a ban on the tool-call markers (a request that declared no tools)."""
        return {**bias, **dict.fromkeys(self.tool_marker_ids, float("-inf"))}

    def check_model(self, name: str) -> None:
        if name not in self.model_names:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.model_names}", "model",
                           "model_not_found")

    def encode_chat(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        """Prompt ids; text inside messages never turns into special tokens (only the template's markers do)."""
        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                      tokenize=True, special_in_content=False)
        except Exception as e:  # the template rejects this conversation (jinja raise_exception, bad fields, ...)
            raise APIError(400, f"cannot render this conversation with the chat template: {e}", "messages") from None

    def max_tokens(self, prompt_len: int, requested: int | None, param: str = "max_tokens",
                   prompt_param: str = "messages") -> int:
        if prompt_len > self.max_prompt_tokens:
            raise self.prompt_too_long(f"{prompt_len} tokens", prompt_param)
        room = self.max_model_len - prompt_len
        if requested is None:
            return min(room, self.default_max_tokens or room)
        if requested > room:
            raise APIError(400, f"{param} is {requested}, but the prompt ({prompt_len} tokens) leaves only {room} "
                                f"of this model's {self.max_model_len}-token context", param,
                           "context_length_exceeded")
        return requested


def request_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


async def launch(st: ServerState, gen) -> None:
    """Start a Generation (time to its first token goes to the metrics); the engine's submission errors (prompt too
    long, bad sampling values) become 400s, a full queue 429, a time limit reached before the first token 504."""
    t0 = time.perf_counter()
    try:
        await gen.start()
    except ValueError as e:
        raise APIError(400, str(e), code="context_length_exceeded" if "long" in str(e) else None) from None
    except (EngineOverloadedError, TimeoutError, RuntimeError) as e:
        raise engine_failure(e) from None
    st.metrics.ttft_sum += time.perf_counter() - t0
    st.metrics.ttft_count += 1


async def start_generation(st: ServerState, request: Request, prepare: Callable, id_prefix: str
                           ) -> tuple[Any, Generation]:
    """Admit a chat-shaped request, prepare it off the event loop (`prepare(st, raw) -> (body, prompt, plan,
    params)`) and start its Generation: (the parsed body, the started generation). A chat without an output
    constraint declared no tools: the tool-call markers are banned, so the model can never open a tool-call section
    (raw `/v1/completions` prompts are left as they are)."""
    with st.admission.waiting():
        deadline = st.deadline()
        body, prompt, plan, params = await st.off_loop(prepare, st, await read_body(request))
        if params.constraint is None:
            params.logit_bias = st.without_tool_markers(params.logit_bias)
        gen = Generation(st.engine, st.tokenizer, st.compiler, prompt, params, plan, request_id(id_prefix), st.hidden,
                         deadline, st.reasoning)
        await launch(st, gen)
    return body, gen


async def read_body(request: Request) -> bytes:
    """The request body (the ASGI middleware has already refused one over the size limit)."""
    try:
        return await request.body()
    except ClientDisconnect:
        raise APIError(499, "the client disconnected while sending the request") from None


def parse_body(model: type[M], raw: bytes) -> M:
    """JSON body -> `model` (run it on the preparation threads: pydantic parses big bodies without the GIL)."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        msg, param = pydantic_message(list(e.errors(include_url=False)))
        raise APIError(400, msg, param) from None


def account(st: ServerState, gen: Generation) -> None:
    st.metrics.prompt_tokens += gen.prompt_tokens
    st.metrics.generation_tokens += sum(gen.completion_tokens)


async def collected(st: ServerState, gen: Generation, request: Request) -> list[Sample] | None:
    """The whole non-streaming answer; None when the client left first (the request is then aborted)."""
    try:
        return await collect_unless_gone(gen, request.is_disconnected)
    except (TimeoutError, RuntimeError) as e:
        raise engine_failure(e) from None
    finally:
        account(st, gen)


def client_gone(st: ServerState) -> Response:
    """The client disconnected before a non-streaming answer was ready; nobody reads this response."""
    st.metrics.aborted += 1
    return Response(status_code=499)
