"""How far SFT collapses the output rows of tokens it never trains as targets.

For each model directory: the tokens that are assistant targets somewhere in the first N conversations of an SFT file,
and the mean cosine of each lm_head row with the mean row, for those tokens and for the rest. Rows that every step
only pushes down (never a target) drift onto one shared direction (cosine -> 1); a token whose row has lost its own
direction cannot be emitted, however well the model has learned to copy.

    python experiments/k2_nano/output_rows.py --data runs/nano/sft3/train.jsonl \
        models/k2-nano-base runs/nano/instruct3/final
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model directories (the first one's tokenizer encodes the data)")
    ap.add_argument("--data", required=True, help="SFT conversations (JSONL)")
    ap.add_argument("--n", type=int, default=3000, help="conversations to read")
    args = ap.parse_args()
    tok = Tokenizer.from_pretrained(args.models[0])
    counts = target_tokens(tok, args.data, args.n)
    print(f"{len(counts)} of {tok.num_base_tokens} base tokens are targets in {args.n} conversations of {args.data}")
    print(f"{'model':40s} {'cos target':>11s} {'cos other':>10s} {'norm target':>12s} {'norm other':>11s}")
    for d in args.models:
        w = K2ForCausalLM.from_pretrained(d, dtype=torch.float32).lm_head.weight.detach()[:tok.num_base_tokens]
        seen = torch.tensor([counts[i] > 0 for i in range(len(w))])
        cos = torch.nn.functional.cosine_similarity(w, w.mean(0, keepdim=True))
        norm = w.norm(dim=1)
        print(f"{d:40s} {cos[seen].mean():11.3f} {cos[~seen].mean():10.3f} {norm[seen].mean():12.3f} "
              f"{norm[~seen].mean():11.3f}")


if __name__ == "__main__":
    main()
