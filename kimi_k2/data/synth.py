"""Synthetic chat and tool-use training data (`kimi-k2 data synth`): DIR/train.jsonl and DIR/heldout.jsonl, one
OpenAI-format conversation per line (`kind`, `split`, `messages`, `tools`).

Train episode i of a seed is, with probability `invented` (a seeded draw of its own), a conversation over tools
invented for it (invented.py), else a reference episode over the executable train tools (kimi_k2/eval/scenarios.py:
single, parallel and sequential calls, a stateful to-do list, refusals, self-introductions, arithmetic, capitals).
Held-out episodes are reference episodes of the held-out split, the benchmarks' distribution; `write_synth` checks
that they share no tool, argument value, phrasing or message with the train episodes before writing anything.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from kimi_k2.data.heldout import check_heldout
from kimi_k2.data.invented import invented_episode
from kimi_k2.eval.scenarios import Episode, episode, episodes


def train_episodes(seed: int, n: int, invented: float = 0.0, pieces: tuple[str, ...] = ()) -> Iterator[Episode]:
    """The `n` train episodes of `seed`; `pieces`: the word pieces of invented words (`invented.word_pieces`)."""
    for i in range(n):
        if invented and random.Random(f"{seed}/broad-mix/{i}").random() < invented:
            yield invented_episode(seed, i, pieces)
        else:
            yield episode(seed, "train", i)


def write_jsonl(path: Path, rows: Iterable) -> int:
    """Write `rows` as JSON lines to `path`, replacing it whole (a failure leaves it as it was); returns the count."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return n


def write_synth(out: Path, train: Iterable[Episode], seed: int, heldout_n: int) -> tuple[int, int]:
    """Write `out`/train.jsonl (the `train` episodes) and `out`/heldout.jsonl (`heldout_n` held-out reference episodes
    of `seed`) once the held-out check passes (it raises ValueError, and nothing is written, when it fails); returns
    the two counts."""
    train = list(train)
    heldout = list(episodes(seed, "heldout", heldout_n))
    check_heldout(train, heldout)
    out.mkdir(parents=True, exist_ok=True)
    return (write_jsonl(out / "train.jsonl", (e.conversation() for e in train)),
            write_jsonl(out / "heldout.jsonl", (e.conversation() for e in heldout)))
