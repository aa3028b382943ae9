"""Which declared tool the model would call first, read off its probabilities: the selection skill on its own.

Each declared tool is scored by the log-probability the model gives to opening a call to it
(`<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>`, teacher-forced after
the rendered prompt); the pick is the best-scored tool. Reported: how often the pick is the expected first call, per
expected tool, the expected tool's mean share of the probability among the declared tools (smoother than the
count), and the mean probability of opening a tool section at all where one is needed and where the answer is
a refusal. Deterministic and a few seconds a model, where `kimi-k2 eval` samples whole episodes.

On the held-out tool_use benchmark (default), or with `--conversations FILE` on the first tool-calling turn of each
conversation of a `kimi-k2 data synth` file that declares two tools or more (the train distribution, new seeds):
the gap between the two is how far the selection skill carries to tools and phrasings never trained.

Probes, rewriting the last user message: `--probe name` appends the expected tool's own name ("... (use
get_forecast)"); `--probe mask` replaces each request word that occurs in the expected tool's name or description by
"thing"; `--probe mask+name` does both; `--probe desc` appends the expected tool's description in parentheses;
`--probe prior` leaves the request and subtracts each tool's score under the neutral request "Hello." before picking.

    python experiments/k2_nano/tool_choice.py models/k2-nano-instruct runs/nano/instruct4/final
    python experiments/k2_nano/tool_choice.py models/k2-nano-instruct --conversations runs/probe/train.jsonl \
        --kind broad_single --limit 80 --probe mask
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from kimi_k2.eval.benchmarks import load_tasks
from kimi_k2.model import K2ForCausalLM
from kimi_k2.tokenizer import Tokenizer


@dataclass
class Choice:
    """One decision: the conversation up to the assistant's turn, the declared tools, the expected first call."""

    messages: list[dict]
    tools: list[dict]
    want: str | None  # None: no tool should be called


@dataclass
class Picks:
    right: Counter = field(default_factory=Counter)  # expected tool -> right picks
    total: Counter = field(default_factory=Counter)  # expected tool -> decisions
    p_call: dict[bool, list[float]] = field(default_factory=lambda: {True: [], False: []})
    p_right: list[float] = field(default_factory=list)  # the expected tool's share of the declared tools' scores

    def line(self) -> str:
        mean = {k: sum(v) / len(v) if v else float("nan") for k, v in self.p_call.items()}
        return (f"first pick {sum(self.right.values())}/{sum(self.total.values())}, mean p(right tool) "
                f"{sum(self.p_right) / len(self.p_right):.3f} | p(call) when needed "
                f"{mean[True]:.2f}, on refusals {mean[False]:.2f}")


def heldout_choices() -> list[Choice]:
    return [Choice([{"role": "system", "content": t["system"]}, {"role": "user", "content": t["turns"][0]["user"]}],
                   t["tools"], t["turns"][0]["calls"][0][0]["name"] if t["turns"][0]["calls"] else None)
            for t in load_tasks("tool_use")[1]]


def conversation_choices(path: str, limit: int, kind: str | None = None) -> list[Choice]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            c = json.loads(line)
            if kind and c["kind"] != kind:
                continue
            msgs, tools = c["messages"], c.get("tools") or []
            first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            if len(tools) >= 2 and msgs[first].get("tool_calls"):
                out.append(Choice(msgs[:first], tools, msgs[first]["tool_calls"][0]["function"]["name"]))
            if len(out) == limit:
                break
    return out


@torch.no_grad()
def opening_logprob(model: K2ForCausalLM, tok: Tokenizer, messages: list[dict], tools: list[dict], name: str
                    ) -> tuple[float, float]:
    """(log p of a call to `name` up to its argument marker, log p of the tool section's first token)."""
    call = {"id": f"functions.{name}:0", "type": "function", "function": {"name": name, "arguments": "{}"}}
    ids, mask = tok.encode_chat_for_training(messages + [{"role": "assistant", "content": None,
                                                          "tool_calls": [call]}], tools)
    start = mask.index(True)
    end = ids.index(tok.special_tokens["<|tool_call_argument_begin|>"], start)
    x = torch.tensor(ids[: end + 1])
    lp = torch.log_softmax(model(x[None])[0, :-1].float(), -1).gather(1, x[1:, None])[:, 0]
    return lp[start - 1:].sum().item(), lp[start - 1].item()


_STOPWORDS = {"the", "of", "a", "an", "for", "to", "by", "in", "and", "get", "data", "one"}


def rewrite(c: Choice, probe: str) -> Choice:
    """`c` with its last user message rewritten by `probe` (name, mask, mask+name, desc; others: unchanged)."""
    if c.want is None or probe not in ("name", "mask", "mask+name", "desc"):
        return c
    c = copy.deepcopy(c)
    text = c.messages[-1]["content"]
    f = next(t["function"] for t in c.tools if t["function"]["name"] == c.want)
    if "mask" in probe:
        own = set(re.findall(r"[a-z]+", f"{f['name'].replace('_', ' ')} {f.get('description', '')}".lower()))
        text = re.sub(r"[A-Za-z]+", lambda m: "thing" if m[0].lower() in own - _STOPWORDS else m[0], text)
    if "name" in probe:
        text += f" (use {c.want})"
    if probe == "desc":
        text += f" ({f.get('description', '')})"
    c.messages[-1]["content"] = text
    return c


def first_picks(model: K2ForCausalLM, tok: Tokenizer, choices: list[Choice], prior: bool = False) -> Picks:
    """Picks over `choices`; with `prior`, each tool's score under a neutral request is subtracted first."""
    picks = Picks()
    for c in choices:
        names = [d["function"]["name"] for d in c.tools]
        scored = {n: opening_logprob(model, tok, c.messages, c.tools, n) for n in names}
        if prior:
            neutral = c.messages[:-1] + [{"role": "user", "content": "Hello."}]
            scored = {n: (s - opening_logprob(model, tok, neutral, c.tools, n)[0], o) for n, (s, o) in scored.items()}
        picks.p_call[c.want is not None].append(torch.tensor(scored[names[0]][1]).exp().item())
        if c.want is not None:
            picks.total[c.want] += 1
            picks.right[c.want] += max(scored, key=lambda n: scored[n][0]) == c.want
            share = torch.softmax(torch.tensor([scored[n][0] for n in names]), 0)[names.index(c.want)]
            picks.p_right.append(share.item())
    return picks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model directories")
    ap.add_argument("--conversations", help="a synth train.jsonl instead of the held-out benchmark")
    ap.add_argument("--limit", type=int, default=250, help="decisions read from --conversations")
    ap.add_argument("--kind", help="only --conversations of this kind (e.g. broad_single)")
    ap.add_argument("--probe", choices=["none", "name", "mask", "mask+name", "desc", "prior"], default="none")
    args = ap.parse_args()
    choices = (conversation_choices(args.conversations, args.limit, args.kind) if args.conversations
               else heldout_choices())
    choices = [rewrite(c, args.probe) for c in choices]
    for path in args.models:
        model = K2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        picks = first_picks(model, Tokenizer.from_pretrained(path), choices, prior=args.probe == "prior")
        print(f"{path}: {picks.line()}")
        if not args.conversations:
            print("    " + "  ".join(f"{n} {picks.right[n]}/{picks.total[n]}" for n in sorted(picks.total)))


if __name__ == "__main__":
    main()
