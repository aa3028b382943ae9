"""Train Kimi-format BPE tokenizers on tens of MB of text that every Python install has; time training, loading and
encoding.

    .venv/bin/python benchmarks/bench_tokenizer_train.py --mb 32 --vocab 4096 8192 16384

Corpus: the Python standard library's sources and docs (`pydoc_data/topics.py` first), cut at --mb megabytes.
"""

from __future__ import annotations

import argparse
import os
import sysconfig
import tempfile
import time
from pathlib import Path

from kimi_k2.tokenizer import Tokenizer
from kimi_k2.tokenizer.trainer import train_tokenizer


def build_corpus(path: Path, megabytes: float) -> int:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / "pydoc_data" / "topics.py"] + sorted(p for p in stdlib.rglob("*.py")
                                                           if "site-packages" not in p.parts)
    budget = int(megabytes * 1e6)
    size = 0
    with path.open("w", encoding="utf-8") as out:
        for f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            text = text[: budget - size]
            out.write(text)
            size += len(text.encode())
            if size >= budget:
                break
    return size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=32.0, help="corpus size in MB")
    ap.add_argument("--vocab", type=int, nargs="+", default=[4096, 8192, 16384], help="base vocabulary sizes")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        size = build_corpus(corpus, args.mb)
        text = corpus.read_text(encoding="utf-8")[:2_000_000]
        print(f"corpus {size / 1e6:.1f} MB, {os.cpu_count()} CPUs")
        print("| base vocab | train s | load s | encode MB/s (1 thread) | bytes/token |")
        print("|---|---|---|---|---|")
        for v in args.vocab:
            out = Path(tmp) / f"tok{v}"
            t0 = time.perf_counter()
            train_tokenizer([corpus], v, out)
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            tok = Tokenizer.from_pretrained(out)
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            ids = tok.encode(text, allow_special=False)
            enc_s = time.perf_counter() - t0
            n = len(text.encode())
            mbps, bpt = n / 1e6 / enc_s, n / len(ids)
            print(f"| {tok.num_base_tokens} | {train_s:.1f} | {load_s:.3f} | {mbps:.1f} | {bpt:.2f} |")


if __name__ == "__main__":
    main()
