"""Training checkpoints: atomic, the last N kept, everything needed to resume bit for bit.

Layout: OUT/checkpoints/step_{step:08d}/{model.pt, optimizer.pt, state.pt} (expert parallel: model.rank{r}.pt and
optimizer.rank{r}.pt per rank instead). A checkpoint is written into a hidden temp folder beside it, every file and
the folder are fsynced, then the folder is renamed into place (rename is atomic on POSIX), so a process killed
mid-save never leaves a folder named step_* that is incomplete.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kimi_k2.checkpoint.writer import fsync_path

STEP_DIR = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict[str, Any]:
    """Every RNG stream, as tensors and plain Python values only (what `torch.load(weights_only=True)` reads)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under OUT/checkpoints, oldest first."""
    ckpts = Path(root) / "checkpoints"
    if not ckpts.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpts.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def begin_checkpoint(root: str | Path, step: int) -> Path:
    """Create (afresh) the hidden temp folder checkpoint `step` is written into."""
    ckpts = Path(root) / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    tmp = ckpts / f".tmp_step_{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def remove_interrupted(root: str | Path) -> None:
    """Clean up after a save that was killed: its `.tmp_step_*` folders, and `.old_step_*` (a checkpoint moved aside
    while a re-save of the same step was renamed in), put back if the kill came before the new one was in place."""
    ckpts = Path(root) / "checkpoints"
    if not ckpts.is_dir():
        return
    for stale in sorted(ckpts.glob(".old_step_*")):
        final = ckpts / stale.name.removeprefix(".old_")
        if final.exists():
            shutil.rmtree(stale)
        else:
            os.rename(stale, final)
    for stale in ckpts.glob(".tmp_step_*"):
        shutil.rmtree(stale)


def write_files(folder: Path, files: dict[str, Any]) -> None:
    for name, obj in files.items():
        with open(folder / name, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())


def commit_checkpoint(root: str | Path, step: int, tmp: Path, keep_last: int) -> Path:
    """fsync the temp folder, rename it to step_{step}, prune all but the last keep_last checkpoints."""
    ckpts = Path(root) / "checkpoints"
    final = ckpts / f"step_{step:08d}"
    fsync_path(tmp)
    stale = ckpts / f".old_step_{step:08d}"
    if final.exists():  # re-saving a step: move the old copy aside first, so a complete step_* always exists
        os.rename(final, stale)
    os.rename(tmp, final)
    fsync_path(ckpts)
    if stale.exists():
        shutil.rmtree(stale)
    for _, old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old)
    return final


def shard_names(rank: int | None) -> tuple[str, str]:
    """File names of the model and optimizer state: one pair, or one per rank when experts are sharded."""
    return ("model.pt", "optimizer.pt") if rank is None else (f"model.rank{rank}.pt", f"optimizer.rank{rank}.pt")


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` (the number of optimizer steps done) atomically; prune all but the last keep_last."""
    tmp = begin_checkpoint(root, step)
    write_files(tmp, {
        "model.pt": model.state_dict(),
        "optimizer.pt": optimizer.state_dict(),
        "state.pt": {**state, "step": step, "rng": rng_state()},
    })
    return commit_checkpoint(root, step, tmp, keep_last)


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, rank: int | None = None
) -> dict[str, Any]:
    """Restore model (and optimizer) in place and the RNG streams; return the saved trainer state (with 'step').

    `rank`: read that rank's shard of an expert-parallel checkpoint (written with the same world size).
    """
    path = Path(path)
    model_file, optim_file = shard_names(rank)
    for name in (model_file, optim_file, "state.pt"):
        if not (path / name).is_file():
            hint = " (expert-parallel checkpoints need the same world size and expert_parallel setting)" \
                if "rank" in name or any(path.glob("*.rank*.pt")) else ""
            raise FileNotFoundError(f"checkpoint {path} has no {name}{hint}")
    model.load_state_dict(torch.load(path / model_file, map_location="cpu", weights_only=True))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / optim_file, map_location="cpu", weights_only=True))
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # never unpickle arbitrary objects: that can run code
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise ValueError(f"{path / 'state.pt'} holds objects other than tensors and plain values "
                         f"({found[1] if found else e}); it was not written by this version of kimi-k2, and is not "
                         f"unpickled") from e
    set_rng_state(state["rng"])
    return state
