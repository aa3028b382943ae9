"""Training checkpoints: sharded (torch.distributed.checkpoint), atomic, the last N kept, exact resume, any layout.

Layout: OUT/checkpoints/step_{step:08d}/ holds
    .metadata, __{rank}_0.distcp   DCP: every rank writes the rows it holds of each tensor (a replicated tensor once)
        model/{name}               every tensor of the model's state dict (FQNs as in the HF checkpoint)
        optim/{name}/{key}         the optimizer state of parameter `name` (momentum_buffer; step, exp_avg, ...)
    state.pt                       rank 0: step, tokens/samples seen, global batch, every rank's RNG streams
The data position is the step (the batch order is a function of seed, step and global batch); the LR schedule is a
function of the step. Loading reads into whatever layout the model has now (single process, DDP, expert parallel,
FSDP2 with any number of shards): DCP maps the saved rows onto the ranks' new rows (resharding).
A checkpoint is written into a hidden temp folder beside it, every file and the folder are fsynced, then rank 0
renames the folder into place (atomic on POSIX) once every rank has written, so a process killed mid-save never
leaves a folder named step_* that is incomplete. The metadata is read with an unpickler that admits DCP's own
classes only (a crafted checkpoint cannot run code).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

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


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns on every single-process save/load that it assumes one process: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as optim/{parameter name}/{key} -> tensor (a Python int step as a 0-d
    int64 tensor). Hyper-parameters are not saved: they come from the recipe, the LR from the schedule."""
    out = {}
    for name, p in model.named_parameters():
        for key, v in optimizer.state.get(p, {}).items():
            if isinstance(v, int):
                v = torch.tensor(v, dtype=torch.int64)
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"optimizer state {name}/{key} is a {type(v).__name__}; checkpoints hold tensors")
            out[f"optim/{name}/{key}"] = v
    return out


def save_checkpoint(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` (the number of optimizer steps done) atomically; prune all but the last keep_last.

    Collective under torch.distributed: every rank calls it (and writes its shards); rank 0 commits. Returns the
    checkpoint's final path.
    """
    rank, world = _world()
    ckpts = Path(root) / "checkpoints"
    tmp = ckpts / f".tmp_step_{step:08d}"
    if rank == 0:
        begin_checkpoint(root, step)
    rngs: list[Any] = [rng_state()]
    if world > 1:
        dist.barrier()
        rngs = [None] * world if rank == 0 else []
        dist.gather_object(rng_state(), rngs if rank == 0 else None, dst=0)
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()} | optimizer_tensors(model, optimizer)
    with _single_process_ok():
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), no_dist=world == 1)
    final = ckpts / f"step_{step:08d}"
    if rank == 0:
        write_files(tmp, {"state.pt": {**state, "step": step, "rng": rngs[0], "rng_ranks": rngs}})
        commit_checkpoint(root, step, tmp, keep_last)
    if world > 1:
        dist.barrier()
    return final


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle: admit only the classes it is made of (DCP's metadata records, torch.Size, dtypes,
    layouts, paths)."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
             ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> Any:
        ok = module in self.MODULES or (module, name) in self.NAMES or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not ok:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")
        return super().find_class(module, name)


class _Reader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path} holds objects other than DCP metadata ({e}); it was not written by this "
                             "version of kimi-k2, and is not unpickled") from e
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path} is not DCP metadata")
        bad = [k for k, v in metadata.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]
        if bad:  # DCP would torch.load such entries with weights_only=False
            raise ValueError(f"checkpoint {path.parent} stores non-tensor objects {bad[:3]}; refusing to load them")
        from torch.distributed.checkpoint.metadata import StorageMeta

        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore model (and optimizer) in place, resharded to their current layout, and this rank's RNG streams; return
    the saved trainer state (with 'step'). Collective under torch.distributed."""
    path = Path(path)
    if not (path / ".metadata").is_file() or not (path / "state.pt").is_file():
        old = " (model.pt: a checkpoint of an earlier kimi-k2, which this version does not read)" \
            if (path / "model.pt").exists() else ""
        raise FileNotFoundError(f"checkpoint {path} is incomplete: it needs .metadata and state.pt{old}")
    reader = _Reader(path)
    saved = reader.read_metadata().state_dict_metadata
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    missing = [k for k in tensors if k not in saved]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors of this model, e.g. {missing[:3]} (a "
                         "different model config?)")
    optim: dict[str, tuple[torch.nn.Parameter, str]] = {}
    if optimizer is not None:
        for name, p in model.named_parameters():
            for key, md in saved.items():
                prefix = f"optim/{name}/"
                if key.startswith(prefix):
                    shape, dtype = md.size, md.properties.dtype
                    like = torch.zeros_like(p, dtype=dtype) if shape == p.shape else torch.zeros(shape, dtype=dtype)
                    tensors[key] = like
                    optim[key] = (p, key.removeprefix(prefix))
    with _single_process_ok():
        dcp.load(tensors, storage_reader=reader, no_dist=not dist.is_initialized())
    if optimizer is not None:
        optimizer.state.clear()
        for key, (p, name) in optim.items():
            v = tensors[key]
            optimizer.state.setdefault(p, {})[name] = int(v) if v.ndim == 0 and v.dtype == torch.int64 else v
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # never unpickle arbitrary objects: that can run code
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise ValueError(f"{path / 'state.pt'} holds objects other than tensors and plain values "
                         f"({found[1] if found else e}); it was not written by this version of kimi-k2, and is not "
                         f"unpickled") from e
    rank, _ = _world()
    rngs = state.get("rng_ranks") or [state["rng"]]
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return state


def read_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The full model tensors of a checkpoint, in one process (for tools and tests; no model needed)."""
    reader = _Reader(Path(path))
    saved = reader.read_metadata().state_dict_metadata
    tensors = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in saved.items() if k.startswith("model/")}
    with _single_process_ok():
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    return {k.removeprefix("model/"): v for k, v in tensors.items()}
