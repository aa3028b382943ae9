"""Text for the K2-Nano tokenizer and pretraining: the corpus plus a slice of the synthetic chats rendered as text.

Writes, under OUT:
  tokenizer/corpus.txt, tokenizer/chat.txt   plain text for `kimi-k2 tokenizer train` (chat markers replaced by
                                             newlines, so no merges are spent on them: they are special tokens)
  pretrain/corpus.jsonl, pretrain/chat.jsonl {"text": ...} documents for `kimi-k2 train` (kind = "pretrain"); each
                                             chat is the full chat-template rendering, markers included, which
                                             `Tokenizer.encode` turns into the special tokens
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from kimi_k2.tokenizer import Tokenizer

# only the template is used: a byte-level tokenizer renders exactly what the trained one will
_RENDER = Tokenizer({bytes([b]): b for b in range(256)})


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


def render_chat(conv: dict) -> str:
    if not isinstance(conv.get("messages"), list):
        raise ValueError(f"conversation has no 'messages' list: {str(conv)[:120]}")
    return _RENDER.apply_chat_template(conv["messages"], conv.get("tools"), add_generation_prompt=False)


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True, help="`kimi-k2 data corpus` JSONL")
    ap.add_argument("--chats", type=Path, required=True, help="`kimi-k2 data synth` train.jsonl")
    ap.add_argument("--n-chats", type=int, required=True, help="how many chats (from the start of the file)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.n_chats < 1:
        raise ValueError(f"--n-chats must be >= 1, got {args.n_chats}")
    docs = [row["text"] for row in read_jsonl(args.corpus)]
    chats = [render_chat(c) for c in read_jsonl(args.chats, args.n_chats)]
    markers = re.compile("|".join(re.escape(s) for s in sorted(_RENDER.special_tokens, key=len, reverse=True)))
    for sub in ("tokenizer", "pretrain"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    (args.out / "tokenizer" / "corpus.txt").write_text("\n\n".join(docs), encoding="utf-8")
    (args.out / "tokenizer" / "chat.txt").write_text("\n\n".join(markers.sub("\n", c) for c in chats), encoding="utf-8")
    write_jsonl(args.out / "pretrain" / "corpus.jsonl", docs)
    write_jsonl(args.out / "pretrain" / "chat.jsonl", chats)
    print(f"{len(docs)} corpus documents ({sum(map(len, docs)) / 1e6:.2f} M chars), {len(chats)} chats "
          f"({sum(map(len, chats)) / 1e6:.2f} M chars) -> {args.out}")


if __name__ == "__main__":
    main()
