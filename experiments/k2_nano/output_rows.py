"""How far SFT collapses the output rows of tokens it never trains as targets, and what that costs on held-out calls.

For each model directory: the mean cosine of each lm_head row with the mean row, for the tokens that are assistant
targets somewhere in the first N conversations of an SFT file and for the rest; then the teacher-forced loss (mean nats
per token) of the held-out tool_use benchmark's expected first calls, split the same way. Rows that every step only
pushes down (never a target) drift onto one shared direction (cosine -> 1); a token whose row has lost its own
direction is hard to emit, however well the model has learned to copy.

    python experiments/k2_nano/output_rows.py --data runs/nano/sft4/train.jsonl \
        models/k2-nano-base runs/nano/instruct3/final runs/nano/instruct4/final
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch

from kimi_k2.config import K2Config
from kimi_k2.eval.benchmarks import load_tasks
from kimi_k2.model import K2ForCausalLM
from kimi_k2.tokenizer import Tokenizer


def target_tokens(tok: Tokenizer, path: str, n: int) -> Counter:
    counts: Counter = Counter()
    with open(path, encoding="utf-8") as f:
        for _, line in zip(range(n), f, strict=False):
            c = json.loads(line)
            ids, mask = tok.encode_chat_for_training(c["messages"], c.get("tools"))
            counts.update(i for i, m in zip(ids, mask, strict=True) if m)
    return counts


def first_calls(tok: Tokenizer) -> list[tuple[list[int], list[bool]]]:
    """Each held-out tool_use task's system + first user turn + the expected calls, encoded with the call mask."""
    out = []
    for t in load_tasks("tool_use")[1]:
        turn = t["turns"][0]
        if not turn["calls"]:
            continue
        calls = [{"id": f"functions.{c['name']}:{i}", "type": "function",
                  "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
                 for i, c in enumerate(turn["calls"][0])]
        msgs = [{"role": "system", "content": t["system"]}, {"role": "user", "content": turn["user"]},
                {"role": "assistant", "content": None, "tool_calls": calls}]
        out.append(tok.encode_chat_for_training(msgs, t["tools"]))
    return out


@torch.no_grad()
def call_loss(model: K2ForCausalLM, encoded: list[tuple[list[int], list[bool]]], seen: torch.Tensor) -> list[float]:
    """Mean nats per expected-call token: [target tokens, never-target tokens]."""
    total, count = torch.zeros(2), torch.zeros(2)
    for ids, mask in encoded:
        x = torch.tensor(ids)
        nll = -torch.log_softmax(model(x[None])[0, :-1].float(), -1).gather(1, x[1:, None])[:, 0]
        m = torch.tensor(mask[1:])
        kind = (~seen[x[1:]]).long()  # 0: a target in the SFT data, 1: never one
        total.index_add_(0, kind[m], nll[m])
        count.index_add_(0, kind[m], torch.ones(int(m.sum())))
    return (total / count.clamp(min=1)).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model directories (the first one's tokenizer encodes the data)")
    ap.add_argument("--data", required=True, help="SFT conversations (JSONL)")
    ap.add_argument("--n", type=int, default=3000, help="conversations to read")
    args = ap.parse_args()
    tok = Tokenizer.from_pretrained(args.models[0])
    counts = target_tokens(tok, args.data, args.n)
    vocab = K2Config.from_pretrained(args.models[0]).vocab_size
    seen = torch.tensor([counts[i] > 0 for i in range(vocab)])
    encoded = first_calls(tok)
    n_never = sum(int((~seen[torch.tensor(ids[1:])])[torch.tensor(mask[1:])].sum()) for ids, mask in encoded)
    print(f"{len(counts)} of {tok.num_base_tokens} base tokens are targets in {args.n} conversations of {args.data}; "
          f"{n_never} of the held-out first calls' tokens are not")
    print(f"{'model':32s} {'cos target':>11s} {'cos other':>10s} {'call nll target':>16s} {'call nll other':>15s}")
    for d in args.models:
        model = K2ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        w = model.lm_head.weight.detach()[:tok.num_base_tokens]
        cos = torch.nn.functional.cosine_similarity(w, w.mean(0, keepdim=True))
        s = seen[:tok.num_base_tokens]
        nll = call_loss(model, encoded, seen)
        print(f"{d:32s} {cos[s].mean():11.3f} {cos[~s].mean():10.3f} {nll[0]:16.3f} {nll[1]:15.3f}")


if __name__ == "__main__":
    main()
