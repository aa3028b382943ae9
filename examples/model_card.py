"""The Kimi K2 model card's client examples, unchanged, runnable against `kimi-k2 serve`.

`simple_chat`, `get_weather`, `tools`, `tool_map` and `tool_call_with_client` are copied from MoonshotAI/Kimi-K2
README.md §5 "Model Usage"; `tool_call_streaming` is the "Tool Calling in Streaming Mode" loop of
MoonshotAI/Kimi-K2 docs/tool_call_guidance.md wrapped in a function (its body unchanged).

    kimi-k2 serve --model models/k2-nano-instruct --served-model-name kimi-k2 &
    python examples/model_card.py --base-url http://127.0.0.1:8000/v1 --model kimi-k2
"""

import argparse
import json

from openai import OpenAI


def simple_chat(client: OpenAI, model_name: str):
    messages = [
        {"role": "system", "content": "You are Kimi, an AI assistant created by Moonshot AI."},
        {"role": "user", "content": [{"type": "text", "text": "Please give a brief self-introduction."}]},
    ]
    response = client.chat.completions.create(
        model=model_name,
        messages=messages,
        stream=False,
        temperature=0.6,
        max_tokens=256
    )
    print(response.choices[0].message.content)


# Your tool implementation
def get_weather(city: str) -> dict:
    return {"weather": "Sunny"}

# Tool schema definition
tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Retrieve current weather information. Call this when the user asks about the weather.",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {
                "city": {
                    "type": "string",
                    "description": "Name of the city"
                }
            }
        }
    }
}]

# Map tool names to their implementations
tool_map = {
    "get_weather": get_weather
}

def tool_call_with_client(client: OpenAI, model_name: str):
    messages = [
        {"role": "system", "content": "You are Kimi, an AI assistant created by Moonshot AI."},
        {"role": "user", "content": "What's the weather like in Beijing today? Use the tool to check."}
    ]
    finish_reason = None
    while finish_reason is None or finish_reason == "tool_calls":
        completion = client.chat.completions.create(
            model=model_name,
            messages=messages,
            temperature=0.6,
            tools=tools,          # tool list defined above
            tool_choice="auto"
        )
        choice = completion.choices[0]
        finish_reason = choice.finish_reason
        if finish_reason == "tool_calls":
            messages.append(choice.message)
            for tool_call in choice.message.tool_calls:
                tool_call_name = tool_call.function.name
                tool_call_arguments = json.loads(tool_call.function.arguments)
                tool_function = tool_map[tool_call_name]
                tool_result = tool_function(**tool_call_arguments)
                print("tool_result:", tool_result)

                messages.append({
                    "role": "tool",
                    "tool_call_id": tool_call.id,
                    "name": tool_call_name,
                    "content": json.dumps(tool_result)
                })
    print("-" * 100)
    print(choice.message.content)


def tool_call_streaming(client: OpenAI, model_name: str):
    messages = [
        {"role": "user", "content": "What's the weather like in Beijing today? Let's check using the tool."}
    ]
    finish_reason = None
    msg = ''
    while finish_reason is None or finish_reason == "tool_calls":
        completion = client.chat.completions.create(
            model=model_name,
            messages=messages,
            temperature=0.3,
            tools=tools,
            tool_choice="auto",
            stream=True
        )
        tool_calls = []
        for chunk in completion:
            delta = chunk.choices[0].delta
            if delta.content:
                msg += delta.content
            if delta.tool_calls:
                for tool_call_chunk in delta.tool_calls:
                    if tool_call_chunk.index is not None:
                        # Extend the tool_calls list
                        while len(tool_calls) <= tool_call_chunk.index:
                            tool_calls.append({
                                "id": "",
                                "type": "function",
                                "function": {
                                    "name": "",
                                    "arguments": ""
                                }
                            })

                        tc = tool_calls[tool_call_chunk.index]

                        if tool_call_chunk.id:
                            tc["id"] += tool_call_chunk.id
                        if tool_call_chunk.function.name:
                            tc["function"]["name"] += tool_call_chunk.function.name
                        if tool_call_chunk.function.arguments:
                            tc["function"]["arguments"] += tool_call_chunk.function.arguments

            finish_reason = chunk.choices[0].finish_reason
        # Note: The finish_reason when tool calls end may vary across different engines, so this condition check needs to be adjusted accordingly
        if finish_reason == "tool_calls":
            for tool_call in tool_calls:
                tool_call_name = tool_call['function']['name']
                tool_call_arguments = json.loads(tool_call['function']['arguments'])
                tool_function = tool_map[tool_call_name]
                tool_result = tool_function(tool_call_arguments)
                messages.append({
                    "role": "tool",
                    "tool_call_id": tool_call['id'],
                    "name": tool_call_name,
                    "content": json.dumps(tool_result),
                })
            # The text generated by the tool call is not the final version, reset msg
            msg = ''

        print(msg)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument("--model", default="kimi-k2")
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    simple_chat(client, args.model)
    tool_call_with_client(client, args.model)
    tool_call_streaming(client, args.model)
