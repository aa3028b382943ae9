"""The held-out benchmarks: which reference episodes they hold, how they are written (tasks/NAME.jsonl), how they load.

A task is a held-out episode's `Episode.task()`: the system prompt, the declared tools, the user turns with the calls
and answer a right reply makes, and the tool environment's state at the end. The shipped files are what
`write_benchmarks` writes from `BENCHMARKS`; a test regenerates them and compares the bytes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from kimi_k2.eval.scenarios import episode

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
# name -> (seed, tasks per kind)
BENCHMARKS: dict[str, tuple[int, dict[str, int]]] = {
    "tool_use": (7001, {"single": 40, "parallel": 20, "sequential": 15, "multi_turn": 15, "refusal": 10}),
    "chat": (7002, {"identity": 5, "arithmetic": 30, "fact": 20}),
}
TASK_KEYS = {"id", "kind", "system", "tools", "turns", "final_state"}


def benchmark_tasks(name: str) -> list[dict]:
    """The tasks of benchmark `name`: `counts[kind]` held-out episodes of each kind, ids NAME-0000, ...; no two tasks
    open with the same user message."""
    if name not in BENCHMARKS:
        raise ValueError(f"no benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    seed, counts = BENCHMARKS[name]
    out, seen = [], set()
    for kind, count in counts.items():
        index, found = 0, 0
        while found < count:
            if index >= 50 * count:
                raise ValueError(f"cannot draw {count} distinct {kind!r} tasks; the held-out pool is too small")
            ep = episode(seed, "heldout", index, kind)
            index += 1
            if ep.turns[0].user not in seen:
                seen.add(ep.turns[0].user)
                out.append(ep.task(f"{name}-{len(out):04d}"))
                found += 1
    return out


def write_benchmarks(out: Path) -> dict[str, int]:
    """Write every benchmark to `out`/NAME.jsonl (each file replaced whole, never half-written); returns the task
    counts."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name in BENCHMARKS:
        tasks = benchmark_tasks(name)
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(t, ensure_ascii=False) + "\n" for t in tasks)
            os.replace(tmp, out / f"{name}.jsonl")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        counts[name] = len(tasks)
    return counts


def load_tasks(name_or_path: str, limit: int | None = None) -> tuple[str, list[dict]]:
    """A shipped benchmark by name (tasks/NAME.jsonl) or a JSONL file of tasks; returns (name, the first `limit`
    tasks)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = TASKS_DIR / f"{name_or_path}.jsonl"
    if not path.is_file():
        shipped = sorted(p.stem for p in TASKS_DIR.glob("*.jsonl"))
        raise ValueError(f"no benchmark {name_or_path!r}: not a file, and not one of {shipped}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    tasks = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                tasks.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON task: {e}") from None
    if not tasks:
        raise ValueError(f"{path} holds no tasks")
    for i, t in enumerate(tasks, 1):
        if not isinstance(t, dict):
            raise ValueError(f"{path}: task {i} is not a JSON object")
        if missing := TASK_KEYS - set(t):
            raise ValueError(f"{path}: task {t.get('id', i)} lacks {sorted(missing)}")
    return path.stem, tasks[:limit]
