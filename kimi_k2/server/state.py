"""What every route needs: the engine, the tokenizer, grammar compiler, served names, metrics, shared checks."""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter

from fastapi import Response

from kimi_k2.server.errors import APIError
from kimi_k2.server.grammar import GrammarCompiler


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
                 default_max_tokens: int | None = None):
        """`default_max_tokens`: completion budget when a request sets none (None: the rest of the context)."""
        self.engine = engine
        self.default_max_tokens = default_max_tokens
        self.tokenizer = tokenizer
        self.model_names = model_names
        self.api_key = api_key
        self.compiler = GrammarCompiler(tokenizer, vocab_size)
        # chat replies drop `special: true` tokens, as Hugging Face's skip_special_tokens (tool-call markers stay)
        self.hidden = re.compile("|".join(re.escape(t) for t, i in tokenizer.special_tokens.items()
                                          if i in tokenizer.skippable_ids))
        self.metrics = Metrics()
        self.created = int(time.time())

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

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

    def max_tokens(self, prompt_len: int, requested: int | None, param: str = "max_tokens") -> int:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt is {prompt_len} tokens, but this model's context is "
                                f"{self.max_model_len} tokens (at least 1 must be left to generate)",
                           "messages", "context_length_exceeded")
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
    long, bad sampling values) become 400s."""
    t0 = time.perf_counter()
    try:
        await gen.start()
    except ValueError as e:
        raise APIError(400, str(e), code="context_length_exceeded" if "long" in str(e) else None) from None
    st.metrics.ttft_sum += time.perf_counter() - t0
    st.metrics.ttft_count += 1


def client_gone(st: ServerState) -> Response:
    """The client disconnected before a non-streaming answer was ready; nobody reads this response."""
    st.metrics.aborted += 1
    return Response(status_code=499)
