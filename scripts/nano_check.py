"""Hand check of a K2-Nano Instruct directory: greedy answers to a self-introduction and to a weather question with a
get_weather tool declared, the latter parsed as K2 tool calls.

    .venv/bin/python scripts/nano_check.py models/k2-nano-instruct [--strict]

--strict exits 1 unless the introduction names Kimi and the weather answer is one well-formed get_weather call.
"""

from __future__ import annotations

import argparse
import json
import sys

from kimi_k2 import toolcalls
from kimi_k2.engine import LLMEngine, SamplingParams
from kimi_k2.eval.tools import TOOLS

SYSTEM = {"role": "system", "content": "You are Kimi, an AI assistant created by Moonshot AI."}
PROMPTS = {
    "intro": ([SYSTEM, {"role": "user", "content": "Please introduce yourself."}], None),
    "weather": ([SYSTEM, {"role": "user", "content": "What's the weather like in Paris right now?"}],
                [TOOLS["get_weather"].spec()]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="model directory with the tokenizer files")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--strict", action="store_true")
    args = ap.parse_args()
    engine = LLMEngine.from_pretrained(args.model)
    if engine.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer (tiktoken.model)")
    prompts = [engine.tokenizer.apply_chat_template(m, t, tokenize=True) for m, t in PROMPTS.values()]
    outs = engine.generate(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0.0))
    ok = True
    for name, out in zip(PROMPTS, outs, strict=True):
        # the engine strips special tokens from .text only when asked; decode the ids to keep tool-call markers
        text = engine.tokenizer.decode(out[0].token_ids)
        content, calls = toolcalls.parse(text)
        print(f"--- {name} ({out[0].finish_reason}):\n{text}")
        print("parsed:", json.dumps({"content": content, "calls": [vars(c) for c in calls]}, ensure_ascii=False))
        if name == "intro":
            ok &= "Kimi" in content and not calls
        else:
            ok &= len(calls) == 1 and calls[0].name == "get_weather" and calls[0].error is None
    print("check:", "PASS" if ok else "FAIL")
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
