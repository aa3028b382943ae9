"""Shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this folder is on sys.path)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_of(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float, object]]:
    """name -> (best wall s, best CPU s, last result) over `repeats` rounds, interleaved so machine load hits all alike.

    CPU time (process_time, all threads) is the steadier figure on a shared machine.
    """
    best: dict[str, tuple[float, float, object]] = {k: (float("inf"), float("inf"), None) for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            out = fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[k] = (min(best[k][0], wall), min(best[k][1], cpu), out)
    return best
