"""Training checkpoints: atomic, the last N kept, everything needed to resume bit for bit.

Layout: OUT/checkpoints/step_{step:08d}/{model.pt, optimizer.pt, state.pt}. A checkpoint is written into a hidden
temp folder beside it, every file and the folder are fsynced, then the folder is renamed into place (rename is
atomic on POSIX), so a process killed mid-save never leaves a folder named step_* that is incomplete.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_DIR = re.compile(r"^step_(\d{8})$")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` (the number of optimizer steps done) atomically; prune all but the last keep_last."""
    ckpts = Path(root) / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / f"step_{step:08d}"
    tmp = ckpts / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {
        "model.pt": model.state_dict(),
        "optimizer.pt": optimizer.state_dict(),
        "state.pt": {**state, "step": step, "rng": rng_state()},
    }
    for name, obj in files.items():
        with open(tmp / name, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    _fsync_path(tmp)
    if final.exists():  # re-saving a step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_path(ckpts)
    for _, old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old)
    return final


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore model (and optimizer) in place and the RNG streams; return the saved trainer state (with 'step')."""
    path = Path(path)
    for name in ("model.pt", "optimizer.pt", "state.pt"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path} has no {name}")
    model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    # python's random state is a tuple of ints and numpy's holds an ndarray: not weights_only material
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    set_rng_state(state["rng"])
    return state
