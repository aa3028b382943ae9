"""OpenAI- and Anthropic-compatible HTTP server (FastAPI + uvicorn) over the engine: `kimi-k2 serve`.

Tool calls: every request that declares tools decodes under an llguidance grammar of the K2 tool-call section
(grammar.py), so a returned call always names a declared tool, carries a K2-native id `functions.{name}:{n}` (n runs
across the conversation) and has arguments valid against that tool's schema. `required` / a named tool / Anthropic
`any` / `tool` force a section; `auto` allows text then an optional section; `none` allows text only.
In `auto` mode nothing unchecked is passed through either: a call that is cut short by `max_tokens`, names an
undeclared tool or fails its schema is dropped from `tool_calls` / `tool_use` (the finish reason is then `length` /
`stop`, never `tool_calls`), and its marker text never appears in the content. A stream has already sent the
beginning of a call cut by `max_tokens`; its finish reason `length` says it is incomplete.
"""
