"""ServerLimits: what one request may ask of the server. `kimi-k2 serve` has a flag for each (this module imports
nothing heavy, so the flags' defaults come from here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerLimits:
    """Defaults as vLLM/OpenAI/nginx users would expect them: generous for real use, bounded for abuse."""

    max_request_bytes: int = 8 << 20  # request body (413); a 256k-token conversation is ~1-2 MB of JSON
    max_stop_sequences: int = 16  # stop / stop_sequences entries (OpenAI allows 4)
    max_stop_chars: int = 1000  # characters per stop string
    max_tools: int = 128  # tools per request (OpenAI's documented maximum)
    max_schema_bytes: int = 256 << 10  # JSON size of a request's tool schemas and response_format schema together
    max_prompt_tokens: int | None = None  # None: the context minus one token
    max_queued_requests: int = 256  # requests admitted but not generating yet; beyond it 429 with Retry-After
    request_timeout_s: float | None = 600.0  # from arrival to the last token (the openai/anthropic clients' default)

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_stop_sequences", "max_stop_chars", "max_tools", "max_schema_bytes",
                     "max_queued_requests", "max_prompt_tokens"):
            v, low = getattr(self, name), 0 if name in ("max_stop_sequences", "max_tools") else 1
            if not (v is None and name == "max_prompt_tokens") and (not isinstance(v, int) or v < low):
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be an int >= {low}, got {v!r}")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s (--request-timeout) must be > 0 or None, got "
                             f"{self.request_timeout_s!r}")
