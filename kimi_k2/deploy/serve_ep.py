"""The engine with the model split over torchrun ranks: routed experts (`kimi-k2 serve --ep N`, `generate --ep N`) or
tensor parallel (`--tensor-parallel-size N`, with `--enable-expert-parallel` the routed experts whole per rank).

Every rank loads its slice of the experts (`load_expert_parallel`) and builds the same LLMEngine, hence the same
latent page pool. Rank 0 schedules, samples and serves HTTP; its ModelRunner sends each step's rows through
`DistributedRunner.step`, so all ranks run `ModelRunner.forward` in lockstep on identical inputs and write identical
latents into their pools. The other ranks mirror steps in `DistributedRunner.serve()` until rank 0 shuts down.
`--ep N` runs on CPU processes (gloo); `--tensor-parallel-size N` (`run_tensor_parallel`) on cuda:LOCAL_RANK per
rank over NCCL where CUDA is available, else on CPU processes over gloo: the pool, inputs and sampling follow the
model's device.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch

from kimi_k2.engine import EngineConfig, LLMEngine
from kimi_k2.parallel import (
    DistributedRunner,
    init_distributed,
    load_expert_parallel,
    load_tensor_parallel,
    shutdown,
)
from kimi_k2.tokenizer import Tokenizer

# workers wait in a broadcast for the next step while the server is idle; gloo's default 30 min timeout would end them
IDLE_TIMEOUT = timedelta(days=365)


class _Stop(Exception):
    """SIGINT/SIGTERM on rank 0: uvicorn drains, restores this handler and re-raises the signal, which lands here."""


def _stop(signum: int, frame: object) -> None:
    raise _Stop


def launch_error(ep: int, command: str = "serve", flag: str = "--ep") -> str | None:
    """Why this process cannot be a rank of `kimi-k2 COMMAND FLAG ep` (None: it can)."""
    how = f"launch it with `torchrun --nproc-per-node {ep} -m kimi_k2.cli {command} DIR {flag} {ep} ...`"
    if ep < 1:
        return f"{flag} must be >= 1, got {ep}"
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return f"{flag} {ep} needs one process per rank, started by torchrun (WORLD_SIZE and RANK are not set): {how}"
    if int(os.environ["WORLD_SIZE"]) != ep:
        return f"{flag} {ep} but torchrun started WORLD_SIZE={os.environ['WORLD_SIZE']} processes: {how}"
    return None


def run_expert_parallel(model_dir: str | os.PathLike[str], config: EngineConfig, dtype: torch.dtype,
                        serve: Callable[[LLMEngine], int], tp_attention: bool = False) -> int:
    """On every torchrun rank: rank 0 returns `serve(engine)` (with model_dir's tokenizer, when it has one), its
    engine's forwards run on all ranks; the other ranks return 0 once rank 0's `serve` has returned (or raised).
    tp_attention: also split MLA by heads over the ranks (`load_expert_parallel`)."""
    info = init_distributed(device="cpu", timeout=IDLE_TIMEOUT)
    try:
        model, _ = load_expert_parallel(model_dir, info.rank, info.world_size, dtype, tp_attention=tp_attention)
        return _run_ranks(info.rank, model, model_dir, config, serve)
    finally:
        shutdown()


def run_tensor_parallel(model_dir: str | os.PathLike[str], config: EngineConfig, dtype: torch.dtype,
                        serve: Callable[[LLMEngine], int], expert_parallel: bool = False,
                        device: torch.device | str | None = None) -> int:
    """`--tensor-parallel-size N [--enable-expert-parallel]` on every torchrun rank: as `run_expert_parallel`, with
    the model split by `load_tensor_parallel`. device: "cpu" (gloo), else cuda:LOCAL_RANK per rank (NCCL) when CUDA
    is available (None: whichever this machine has)."""
    info = init_distributed(device=None if device is None or torch.device(device).type == "cuda" else "cpu",
                            timeout=IDLE_TIMEOUT)
    try:
        model, _ = load_tensor_parallel(model_dir, info.rank, info.world_size, dtype, info.device,
                                        expert_parallel=expert_parallel, fp8_resident=info.device.type == "cuda")
        return _run_ranks(info.rank, model, model_dir, config, serve)
    finally:
        shutdown()


def _run_ranks(rank: int, model: torch.nn.Module, model_dir: str | os.PathLike[str], config: EngineConfig,
               serve: Callable[[LLMEngine], int]) -> int:
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
