"""OpenAI Responses API request body (https://platform.openai.com/docs/api-reference/responses/create).

What this server does with it (`responses_api`): input items (messages, function calls and their outputs, reasoning)
and `instructions` become a chat conversation; function tools, `tool_choice`, `text.format` (JSON schema) and the
sampling fields map onto the chat path. There is no server-side state (`store` is answered false): a request that
needs stored state (`previous_response_id`, `conversation`, `background`, `prompt`) gets a 400 naming the field.
Unknown fields are accepted and ignored, `null` means absent.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from kimi_k2.server.openai_protocol import TOOL_NAME, Lenient

# hosted tools of OpenAI's API, which only OpenAI runs
HOSTED_TOOLS = ("web_search", "web_search_preview", "file_search", "computer_use_preview", "code_interpreter",
                "image_generation", "mcp", "local_shell", "shell", "apply_patch", "custom")


class InputText(Lenient):
    type: Literal["input_text", "output_text", "text", "summary_text", "reasoning_text", "refusal", "input_image",
                  "input_file", "input_audio"]
    text: str | None = None
    refusal: str | None = None


class MessageItem(Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]
    id: str | None = None


class FunctionCallItem(Lenient):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None


class FunctionCallOutputItem(Lenient):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]
    id: str | None = None


class ReasoningItem(Lenient):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[InputText] = Field(default_factory=list)
    content: list[InputText] | None = None
    encrypted_content: str | None = None


class OtherItem(Lenient):
    """Any other item type (item_reference, hosted tool calls): rejected with its type named."""

    type: str


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem | OtherItem


class FunctionTool(Lenient):
    type: str = "function"
    name: str | None = Field(default=None, pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(Lenient):
    type: str
    name: str | None = None


class TextFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(Lenient):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(Lenient):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stream: bool | None = None
    store: bool | None = None
    background: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
