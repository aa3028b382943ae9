"""One Tau2-style episode: a scripted user speaks the task's turns in order, the model under test answers through an
OpenAI-compatible endpoint, and every tool call it makes runs against the real tool environment of the task.

Within a user turn the model may call tools for up to `max_steps` assistant messages; the first message without tool
calls is its final answer for the turn. The user then says the next scripted turn whatever happened, so later turns
are scored too. The episode succeeds when every turn does and, as in Tau2-bench, the environment ends in the task's
`final_state` (the cart of a shopping episode, say).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import openai

from kimi_k2.eval.scoring import score_turn
from kimi_k2.eval.tools import ToolEnv, ToolError


@dataclass
class Sampling:
    model: str
    temperature: float = 0.6  # the K2 model cards' evaluation temperature
    max_tokens: int = 512
    max_steps: int = 4
    seed: int | None = None


def run_episode(client: openai.OpenAI, task: dict, sampling: Sampling, sample: int) -> dict:
    """Play `task` once; returns the per-sample record (scores per turn, success, transcript, error if any)."""
    offered = [t["function"]["name"] for t in task["tools"]]
    env = ToolEnv(offered)
    messages: list[dict] = [{"role": "system", "content": task["system"]}]
    turns, error = [], None
    extra = {"tools": task["tools"]} if task["tools"] else {}
    if sampling.seed is not None:
        extra["seed"] = sampling.seed + sample
    for turn in task["turns"]:
        messages.append({"role": "user", "content": turn["user"]})
        made: list[tuple[str, str]] = []
        answer = ""
        try:
            for _ in range(sampling.max_steps):
                resp = client.chat.completions.create(model=sampling.model, messages=messages,
                                                      temperature=sampling.temperature,
                                                      max_tokens=sampling.max_tokens, **extra)
                msg = resp.choices[0].message
                if not msg.tool_calls:
                    answer = msg.content or ""
                    messages.append({"role": "assistant", "content": answer})
                    break
                calls = [(c.id, c.function.name, c.function.arguments) for c in msg.tool_calls]
                messages.append({"role": "assistant", "content": msg.content, "tool_calls": [
                    {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in calls]})
                for call_id, name, arguments in calls:
                    made.append((name, arguments))
                    try:
                        result = env.call(name, arguments)
                    except ToolError as e:
                        result = {"error": str(e)}
                    messages.append({"role": "tool", "tool_call_id": call_id, "name": name,
                                     "content": json.dumps(result)})
        except openai.OpenAIError as e:
            error = f"{type(e).__name__}: {e}"
        expected = [c for r in turn["calls"] for c in r]
        score = score_turn(made, answer, expected, turn["expect"], set(offered))
        turns.append(asdict(score) | {"success": score.success, "answer": answer})
        if error:
            break
    state_ok = env.state == task["final_state"]
    success = error is None and state_ok and len(turns) == len(task["turns"]) and all(t["success"] for t in turns)
    return {"task_id": task["id"], "kind": task["kind"], "sample": sample, "success": success, "error": error,
            "state_ok": state_ok, "turns": turns, "messages": messages}
