"""The engine with routed experts split over torchrun ranks (`kimi-k2 serve --ep N`, `kimi-k2 generate --ep N`).

Every rank loads its slice of the experts (`load_expert_parallel`) and builds the same LLMEngine, hence the same
latent page pool. Rank 0 schedules, samples and serves HTTP; its ModelRunner sends each step's rows through
`DistributedRunner.step`, so all ranks run `ModelRunner.forward` in lockstep on identical inputs and write identical
latents into their pools. The other ranks mirror steps in `DistributedRunner.serve()` until rank 0 shuts down.
CPU only (gloo): the engine's page pool lives in host memory.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch

from kimi_k2.engine import EngineConfig, LLMEngine
from kimi_k2.parallel import DistributedRunner, init_distributed, load_expert_parallel, shutdown
from kimi_k2.tokenizer import Tokenizer

# workers wait in a broadcast for the next step while the server is idle; gloo's default 30 min timeout would end them
IDLE_TIMEOUT = timedelta(days=365)


class _Stop(Exception):
    """SIGINT/SIGTERM on rank 0: uvicorn drains, restores this handler and re-raises the signal, which lands here."""


def _stop(signum: int, frame: object) -> None:
    raise _Stop


def launch_error(ep: int, command: str = "serve") -> str | None:
    """Why this process cannot be a rank of `kimi-k2 COMMAND --ep ep` (None: it can)."""
    how = f"launch it with `torchrun --nproc-per-node {ep} -m kimi_k2.cli {command} DIR --ep {ep} ...`"
    if ep < 1:
        return f"--ep must be >= 1, got {ep}"
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return f"--ep {ep} needs one process per rank, started by torchrun (WORLD_SIZE and RANK are not set): {how}"
    if int(os.environ["WORLD_SIZE"]) != ep:
        return f"--ep {ep} but torchrun started WORLD_SIZE={os.environ['WORLD_SIZE']} processes: {how}"
    return None


def run_expert_parallel(model_dir: str | os.PathLike[str], config: EngineConfig, dtype: torch.dtype,
                        serve: Callable[[LLMEngine], int], tp_attention: bool = False) -> int:
    """On every torchrun rank: rank 0 returns `serve(engine)` (with model_dir's tokenizer, when it has one), its
    engine's forwards run on all ranks; the other ranks return 0 once rank 0's `serve` has returned (or raised).
    tp_attention: also split MLA by heads over the ranks (`load_expert_parallel`)."""
    info = init_distributed(device="cpu", timeout=IDLE_TIMEOUT)
    try:
        rank = info.rank
        model, _ = load_expert_parallel(model_dir, rank, info.world_size, dtype, tp_attention=tp_attention)
        has_tokenizer = rank == 0 and (Path(model_dir) / "tiktoken.model").is_file()
        engine = LLMEngine(model, Tokenizer.from_pretrained(model_dir) if has_tokenizer else None, config)
        runner = DistributedRunner(engine.runner.forward)
        if rank != 0:  # Ctrl-C or torchrun's SIGTERM reach every rank: rank 0 drains, then releases the others
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, signal.SIG_IGN)
            runner.serve()
            return 0
        engine.runner.forward_fn = runner.step
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, _stop)
        try:
            return serve(engine)
        except _Stop:
            return 0
        finally:
            runner.shutdown()
    finally:
        shutdown()
