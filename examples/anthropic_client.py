"""The Anthropic Messages API against `kimi-k2 serve` (our own example, not from the model card): a chat, then a
tool-use round trip with `tool_result`, streamed.

    python examples/anthropic_client.py --base-url http://127.0.0.1:8000 --model kimi-k2
"""

import argparse
import json

import anthropic

TOOLS = [{
    "name": "get_weather",
    "description": "Retrieve current weather information.",
    "input_schema": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}},
}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument("--model", default="kimi-k2")
    args = p.parse_args()
    client = anthropic.Anthropic(base_url=args.base_url, api_key=args.api_key)

    reply = client.messages.create(model=args.model, max_tokens=128, system="You are Kimi.",
                                   messages=[{"role": "user", "content": "Please give a brief self-introduction."}])
    print(reply.content[0].text if reply.content else "")

    messages = [{"role": "user", "content": "What's the weather like in Beijing today?"}]
    with client.messages.stream(model=args.model, max_tokens=256, messages=messages, tools=TOOLS,
                                tool_choice={"type": "any"}) as stream:
        for text in stream.text_stream:
            print(text, end="", flush=True)
        reply = stream.get_final_message()
    messages.append({"role": "assistant", "content": reply.content})
    results = [{"type": "tool_result", "tool_use_id": b.id, "content": json.dumps({"weather": "Sunny"})}
               for b in reply.content if b.type == "tool_use"]
    if results:
        messages.append({"role": "user", "content": results})
        reply = client.messages.create(model=args.model, max_tokens=128, messages=messages, tools=TOOLS)
        print("\n" + "".join(b.text for b in reply.content if b.type == "text"))


if __name__ == "__main__":
    main()
