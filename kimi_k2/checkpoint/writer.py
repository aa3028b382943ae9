"""Atomic writing of Hugging Face safetensors checkpoints: size-capped shards, index, config.json.

Everything goes into a temporary directory next to the target; files are fsynced, then the directory is renamed
into place, so an interrupted save leaves either the old checkpoint or none, never a half-written one.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import torch
from safetensors.torch import save_file

from kimi_k2.checkpoint.fp8 import FP8_DTYPE, SCALE_SUFFIX, is_quantized_name, quantize_block_fp8
from kimi_k2.checkpoint.int4 import is_int4_target, quantize_int4
from kimi_k2.checkpoint.reader import FP32_TENSORS, INDEX_FILE, SINGLE_FILE, CheckpointError
from kimi_k2.config import K2Config, check_quantization_config, int4_quantization_config

FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
}
WEIGHT_FILES = (INDEX_FILE, "config.json")  # plus every *.safetensors: what a save replaces


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_weight_file(name: str) -> bool:
    return name.endswith(".safetensors") or name in WEIGHT_FILES


class ShardWriter:
    """Collects tensors into shards of at most `max_shard_size` bytes (a single larger tensor gets its own shard).

    Use as a context manager: `commit(config)` publishes the checkpoint; leaving the block without it (or with an
    exception) deletes the temporary directory and leaves `directory` untouched.
    """

    def __init__(self, directory: str | os.PathLike[str], max_shard_size: int = 5 * 2**30) -> None:
        if not isinstance(max_shard_size, int) or max_shard_size <= 0:
            raise ValueError(f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}")
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint target {self.directory} exists and is not a directory")
        self.max_shard_size = max_shard_size
        self.tmp = self.directory.parent / f".{self.directory.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=True)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shard_names: list[list[str]] = []  # tensor names per written shard
        self.total_size = 0
        self._seen: set[str] = set()
        self._storages: set[int] = set()

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Add tensors that must land in the same shard (a weight and its scale)."""
        group = {}
        for name, t in tensors.items():
            if name in self._seen:
                raise CheckpointError(f"tensor {name} was written twice")
            if t.is_meta:
                raise CheckpointError(f"tensor {name} is on the meta device and has no data to save")
            self._seen.add(name)
            t = t.detach().to("cpu").contiguous()
            if t.untyped_storage().data_ptr() in self._storages:  # tied/shared tensors: safetensors wants copies
                t = t.clone()
            self._storages.add(t.untyped_storage().data_ptr())
            group[name] = t
        size = sum(t.nbytes for t in group.values())
        if self.pending and self.pending_bytes + size > self.max_shard_size:
            self._flush()
        self.pending.update(group)
        self.pending_bytes += size
        self.total_size += size

    def _flush(self) -> None:
        save_file(self.pending, self.tmp / f"shard-{len(self.shard_names):05d}.tmp", metadata={"format": "pt"})
        self.shard_names.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0
        self._storages.clear()

    def commit(self, config: K2Config, extra_files: Iterable[str | os.PathLike[str]] = ()) -> None:
        if self.pending or not self.shard_names:
            self._flush()
        n = len(self.shard_names)
        files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, file in enumerate(files):
            os.replace(self.tmp / f"shard-{i:05d}.tmp", self.tmp / file)
        if n > 1:
            weight_map = {name: file for file, names in zip(files, self.shard_names, strict=True) for name in names}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        config.save_pretrained(self.tmp)
        for src in map(Path, extra_files):
            if not src.exists():
                raise CheckpointError(f"extra file {src} does not exist")
            if is_weight_file(src.name):
                raise CheckpointError(f"extra file {src.name} would overwrite a checkpoint file")
            copy = shutil.copytree if src.is_dir() else shutil.copy2
            copy(src, self.tmp / src.name)
        if self.directory.is_dir():  # keep what the old directory holds besides weights (tokenizer, ...)
            for old in self.directory.iterdir():
                if not is_weight_file(old.name) and not (self.tmp / old.name).exists():
                    (shutil.copytree if old.is_dir() else shutil.copy2)(old, self.tmp / old.name)
        for f in self.tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        fsync_path(self.tmp)
        self._publish()

    def _publish(self) -> None:
        """Swap the finished temp dir into place; the old checkpoint is removed only after the new one is there."""
        old = None
        if self.directory.exists():
            old = self.directory.parent / f".{self.directory.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.directory, old)
        os.replace(self.tmp, self.directory)
        fsync_path(self.directory.parent)
        if old is not None:
            shutil.rmtree(old)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.tmp.exists():  # not committed (or failed half way): throw the partial output away
            self.abort()


def remove_interrupted_writes(directory: str | os.PathLike[str]) -> list[Path]:
    """Clean up after a save into `directory` that was killed (a SIGKILL skips `ShardWriter`'s own cleanup) -> the
    folders removed: its `.NAME.tmp-*` temp folders, and `.NAME.old-*` (the previous checkpoint, moved aside while
    the new one is renamed in), which is put back instead when the kill came before the new one was in place."""
    directory = Path(directory)
    if not directory.parent.is_dir():
        return []
    removed = []
    for kind in ("old", "tmp"):
        for stale in sorted(directory.parent.glob(f".{directory.name}.{kind}-*")):
            if kind == "old" and not directory.exists():
                os.replace(stale, directory)
                continue
            shutil.rmtree(stale)
            removed.append(stale)
    return removed


def prepare(name: str, t: torch.Tensor, fp8: bool, block: tuple[int, int] = (128, 128),
            int4: dict | None = None) -> dict[str, torch.Tensor]:
    """The stored tensors for one logical tensor: itself, its block-FP8 form plus `<name>_scale_inv`, or (a target
    of the compressed-tensors config `int4`) its INT4 form `<name>_packed`, `<name>_scale`, `<name>_shape`."""
    if t.dtype == FP8_DTYPE:
        raise CheckpointError(f"tensor {name} is already float8; pass dequantized weights to save")
    if name.endswith(FP32_TENSORS):
        return {name: t.float()}
    if int4 is not None and is_int4_target(name, int4) and t.ndim == 2:
        try:
            stored = quantize_int4(t, check_quantization_config(int4))
        except ValueError as e:
            raise CheckpointError(f"cannot quantize {name} to INT4: {e}") from e
        return {f"{name}_{suffix.removeprefix('weight_')}": v for suffix, v in stored.items()}
    if not (fp8 and is_quantized_name(name) and t.ndim == 2):
        return {name: t}
    try:
        q, scale = quantize_block_fp8(t, block)
    except ValueError as e:
        raise CheckpointError(f"cannot quantize {name}: {e}") from e
    return {name: q, name + SCALE_SUFFIX: scale}


def int4_config_for(config: K2Config) -> dict:
    """The compressed-tensors config an INT4 save of `config` uses: its own, or K2-Thinking's (routed experts)."""
    return config.quantization_config if config.is_int4 else int4_quantization_config()  # type: ignore[return-value]


def checkpoint_config(config: K2Config, fp8: bool, torch_dtype: torch.dtype | None,
                      int4: dict | None = None) -> K2Config:
    """`config` with quantization_config set (fp8, or the compressed-tensors config `int4`) or removed, and
    torch_dtype naming the unquantized dtype."""
    if fp8 and int4 is not None:
        raise ValueError("a checkpoint is block-FP8 or INT4, not both")
    quantization = copy.deepcopy(int4) if int4 is not None else dict(FP8_QUANTIZATION_CONFIG) if fp8 else None
    changes: dict = {"quantization_config": quantization}
    if torch_dtype is not None:
        changes["torch_dtype"] = str(torch_dtype).removeprefix("torch.")
    return config.replace(**changes)


def save_state_dict(
    state_dict: dict[str, torch.Tensor],
    directory: str | os.PathLike[str],
    config: K2Config,
    fp8: bool = False,
    max_shard_size: int = 5 * 2**30,
    extra_files: Iterable[str | os.PathLike[str]] = (),
    int4: bool = False,
) -> None:
    """Write `state_dict` in the Hugging Face layout (shards + index, or one model.safetensors) with config.json.

    With `fp8=True` every projection weight is stored block-FP8 (128x128) with an fp32 `weight_scale_inv`, as in the
    published Kimi K2 checkpoint; embeddings, lm_head, norms and the router stay unquantized. With `int4=True` the
    targets of the compressed-tensors config (`config`'s own, else K2-Thinking's: the routed experts) are stored INT4
    pack-quantized, as in the published Kimi-K2-Thinking checkpoint, the rest as given.
    """
    dtype = next((t.dtype for n, t in state_dict.items()
                  if t.is_floating_point() and not n.endswith(FP32_TENSORS)), None)
    int4_config = int4_config_for(config) if int4 else None
    final = checkpoint_config(config, fp8, dtype, int4_config)  # fails (fp8 and int4) before anything is written
    with ShardWriter(directory, max_shard_size) as writer:
        for name, t in state_dict.items():
            writer.add(prepare(name, t, fp8, int4=int4_config))
        writer.commit(final, extra_files)
