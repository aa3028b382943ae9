"""OpenAI- and Anthropic-compatible HTTP server (FastAPI + uvicorn) over the engine: `kimi-k2 serve`.

Tool calls: every request that declares tools decodes under an llguidance grammar of the K2 tool-call section
(grammar.py), so a returned call always names a declared tool, carries a K2-native id `functions.{name}:{n}` (n runs
across the conversation) and has arguments valid against that tool's schema. `required` / a named tool / Anthropic
`any` / `tool` force a section; `auto` allows text then an optional section; `none` allows text only.
In `auto` mode nothing unchecked is passed through either: a call that is cut short by `max_tokens`, names an
undeclared tool or fails its schema is dropped from `tool_calls` / `tool_use` (the finish reason is then `length` /
`stop`, never `tool_calls`), and its marker text never appears in the content. A stream has already sent the
beginning of a call cut by `max_tokens`; its finish reason `length` says it is incomplete.
With `required` / a named tool the reply is only a tool-call section, so stop strings (which cut text) do not apply.
A chat request that declares no tools has the tool-call section markers banned, so it never ends as an empty message.

Drop-in for vLLM / SGLang deployments (issue 17): the routes are vLLM's (/v1/chat/completions, /v1/completions with
batched prompts, /v1/responses, /v1/models and /v1/models/{id}) with OpenAI's wire details (logprobs in the chunk of
their text, echo with prompt logprobs, logit_bias, `"usage": null` on non-final chunks, system_fingerprint). With
`--reasoning-parser kimi_k2` (Kimi-K2-Thinking) the `<think>` span is OpenAI `reasoning_content`, an Anthropic
`thinking` block and a Responses reasoning item, and reasoning sent back in a history goes where the template wants it.

Under load and abuse (issue 18): every limit is a `ServerLimits` field and a `kimi-k2 serve` flag. A body over the
size limit is answered 413 from its Content-Length before anything is read (or as soon as a chunked body passes it);
a prompt the body alone proves too long is a 400 before tokenizing; beyond --max-queued-requests requests waiting to
start, 429 with Retry-After; past --request-timeout a request ends with 504 (a stream: an error event) and frees its
pages. Parsing, chat rendering, tokenization and grammar compilation run on preparation threads, never on the event
loop or the engine thread; a schema with no finite value (a `$ref` recursion with no way out) is a 400 naming it.
With an API key set, either presented credential (`Authorization: Bearer`, `x-api-key`) may carry it, and /metrics
needs it too unless --public-metrics.
"""
