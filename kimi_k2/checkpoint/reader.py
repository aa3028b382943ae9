"""Lazy reading of Hugging Face safetensors checkpoints (single file or sharded with an index), block-FP8 aware.

Only safetensors headers are read up front; tensor data is read shard by shard, tensor by tensor, through
`safetensors.safe_open`, so loading never holds more than one tensor of the checkpoint beyond the model itself.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from kimi_k2.checkpoint.fp8 import FP8_DTYPE, SCALE_SUFFIX, dequantize_block_fp8, scale_shape

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FP32_TENSORS = ("e_score_correction_bias",)  # the router computes in fp32 whatever the model dtype
LOAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # present in some published checkpoints; recomputed by the model

_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16, "F16": torch.float16,
    "F32": torch.float32, "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the tensor or file."""


def read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from a safetensors header: u64 little-endian length, then that much JSON."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > os.path.getsize(path) - 8:
                raise ValueError(f"header length {n} exceeds the file size")
            header = json.loads(f.read(n))
        return {
            k: (_DTYPES[v["dtype"]], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"
        }
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"unreadable safetensors file {path}: {e!r}") from e


def loaded_dtype(name: str, stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """fp32 for the router bias; `dtype` for floats (fp8 dequantizes to bf16 when None); else as stored."""
    if dtype is not None and dtype not in LOAD_DTYPES:
        raise ValueError(f"cannot load weights as {dtype}; choose one of {LOAD_DTYPES} (or None: as stored)")
    if name.endswith(FP32_TENSORS):
        return torch.float32
    if stored == FP8_DTYPE:
        return dtype or torch.bfloat16
    return dtype if dtype is not None and stored.is_floating_point else stored


class CheckpointReader:
    """Names, shapes and (dequantized) tensors of the checkpoint in `directory`, read lazily."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            self.weight_map = _read_index(index)
        elif single.is_file():
            self.weight_map = dict.fromkeys(read_header(single), SINGLE_FILE)
        elif not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
        else:
            raise CheckpointError(f"{self.directory} has neither {INDEX_FILE} nor {SINGLE_FILE}")
        self.shards = list(dict.fromkeys(self.weight_map.values()))
        headers = {}
        for shard in self.shards:
            if not (self.directory / shard).is_file():
                raise CheckpointError(f"shard {shard} named in {index} is missing from {self.directory}")
            headers[shard] = read_header(self.directory / shard)
        self.info: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for name, shard in self.weight_map.items():
            if name not in headers[shard]:
                raise CheckpointError(f"tensor {name} is mapped to shard {shard} by {index}, but is not in it")
            self.info[name] = headers[shard][name]
        self.block = _block_size(self.directory / "config.json")
        self.names = [n for n in self.weight_map if not n.endswith(IGNORED_SUFFIXES) and not self._is_scale_of_fp8(n)]
        self._name_set = set(self.names)
        self._by_shard: dict[str, list[str]] = {shard: [] for shard in self.shards}
        for name in self.names:
            self._by_shard[self.weight_map[name]].append(name)
        for name in self.names:
            if self.stored_dtype(name) == torch.float8_e5m2:
                raise CheckpointError(f"tensor {name} is float8_e5m2; only e4m3 block-FP8 is supported")
            if self.is_fp8(name):
                self._check_scale(name)

    # ---- metadata ----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        """Logical tensor names in index order: `_scale_inv` companions and ignorable tensors left out."""
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._name_set

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info[name][1]

    def stored_dtype(self, name: str) -> torch.dtype:
        return self.info[name][0]

    def is_fp8(self, name: str) -> bool:
        return self.stored_dtype(name) == FP8_DTYPE

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data as stored (fp8 weights and their scales included)."""
        return sum(_nbytes(*self.info[name]) for name in self.weight_map)

    def names_in(self, shard: str) -> list[str]:
        return self._by_shard[shard]

    # ---- data -------------------------------------------------------------------------------------
    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, dequantized if block-FP8, in the dtype `loaded_dtype` gives."""
        if name not in self:
            raise CheckpointError(f"tensor {name} is not in the checkpoint {self.directory}")
        (_, _, t), = self._walk({name}, dtype)
        return t

    def tensors(
        self, dtype: torch.dtype | None = None, names: set[str] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every logical tensor (or those in `names`), one shard open at a time."""
        for _, name, t in self._walk(names, dtype):
            yield name, t

    def read_into(self, outs: dict[str, torch.Tensor]) -> None:
        """Copy (dequantizing, casting) each named tensor into the preallocated `outs[name]`, shard by shard."""
        for _ in self._walk(set(outs), None, outs):
            pass

    def _walk(
        self, names: set[str] | None, dtype: torch.dtype | None, outs: dict[str, torch.Tensor] | None = None
    ) -> Iterator[tuple[str, str, torch.Tensor]]:
        for shard in self.shards:
            todo = [n for n in self.names_in(shard) if names is None or n in names]
            if not todo:
                continue
            with safe_open(self.directory / shard, framework="pt") as f:
                for name in todo:
                    # allocated before the temporaries of dequantization, so those are freed from the top of the
                    # heap (allocating them first fragmented glibc's heap and doubled the RSS of a model load)
                    out = outs[name] if outs is not None else torch.empty(
                        self.shape(name), dtype=loaded_dtype(name, self.stored_dtype(name), dtype))
                    yield shard, name, self._read(f, shard, name, out)

    def _read(self, f: Any, shard: str, name: str, out: torch.Tensor) -> torch.Tensor:
        t = f.get_tensor(name)  # a view of the file's mmap: copied into `out`, so the model owns its memory
        if t.dtype != FP8_DTYPE:
            return out.copy_(t)
        scale_name = name + SCALE_SUFFIX
        if self.weight_map[scale_name] == shard:
            scale = f.get_tensor(scale_name)
        else:  # the scale lives in another shard: read just that tensor
            with safe_open(self.directory / self.weight_map[scale_name], framework="pt") as g:
                scale = g.get_tensor(scale_name)
        if not torch.isfinite(scale).all():
            raise CheckpointError(f"{scale_name} has inf/nan entries")
        return dequantize_block_fp8(t, scale, self.block, out=out)

    # ---- checks -----------------------------------------------------------------------------------
    def _is_scale_of_fp8(self, name: str) -> bool:
        base = name.removesuffix(SCALE_SUFFIX)
        return base != name and base in self.info and self.is_fp8(base)

    def _check_scale(self, name: str) -> None:
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self.weight_map:
            raise CheckpointError(f"fp8 tensor {name} has no {scale_name} in the checkpoint {self.directory}")
        shape = self.shape(name)
        if len(shape) != 2:
            raise CheckpointError(f"fp8 tensor {name} must be 2-D for block scaling, has shape {shape}")
        want, got = scale_shape(shape, self.block), self.shape(scale_name)
        if got != want:
            raise CheckpointError(
                f"{scale_name} has shape {got}, expected {want} for weight {shape} with block {self.block}"
            )


def _read_index(index: Path) -> dict[str, str]:
    try:
        raw = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt or unreadable index {index}: {e}") from e
    wm = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise CheckpointError(f"index {index} has no weight_map of tensor name -> shard file")
    for shard in set(wm.values()):
        if Path(shard).name != shard:
            raise CheckpointError(f"index {index} names shard {shard!r} outside the checkpoint directory")
    return wm


def _block_size(config_file: Path) -> tuple[int, int]:
    """weight_block_size from config.json's quantization_config, (128, 128) when absent."""
    try:
        q = json.loads(config_file.read_text()).get("quantization_config") or {}
    except FileNotFoundError:
        return (128, 128)
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"unreadable {config_file}: {e}") from e
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{config_file}: weight_block_size {block!r} is not two positive ints")
    return block[0], block[1]


def _some(names: list[str], n: int = 20) -> str:
    return str(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def load_into(
    model: nn.Module,
    directory: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
) -> None:
    """Materialize every parameter and persistent buffer of `model` (meta-device is fine) from a checkpoint.

    Block-FP8 weights are dequantized; `dtype=None` keeps each tensor's stored dtype (fp8 -> bf16). Every name and
    shape is checked against the safetensors headers before any data is read. Tensors the model does not have are
    an error, or a warning with `strict=False`; tensors the checkpoint lacks are always an error.
    """
    reader = CheckpointReader(directory)
    targets = model.state_dict(keep_vars=True)
    # tied tensors (lm_head.weight = embed_tokens.weight) are one object under several names: read it once, under
    # the first of its names the checkpoint has
    source: dict[int, str] = {}
    for name, t in targets.items():
        if name in reader:
            source.setdefault(id(t), name)
    missing = [n for n, t in targets.items() if id(t) not in source]
    unexpected = [n for n in reader if n not in targets]
    if missing:
        raise CheckpointError(
            f"checkpoint {reader.directory} lacks {len(missing)} tensors of the model: {_some(missing)}"
        )
    if unexpected:
        msg = f"checkpoint {reader.directory} has {len(unexpected)} tensors the model does not: {_some(unexpected)}"
        if strict:
            raise CheckpointError(msg)
        warnings.warn(msg, stacklevel=2)
    for name, t in targets.items():
        if name in reader and tuple(t.shape) != reader.shape(name):
            raise CheckpointError(
                f"shape mismatch for {name}: checkpoint {reader.shape(name)}, model {tuple(t.shape)}"
            )
    # a tensor already materialized with the right dtype and device is filled in place (the Parameter objects that
    # optimizers and hooks hold stay valid); anything else (meta, other dtype/device) gets a new tensor
    dev = torch.empty(0, device=device).device  # "cuda" -> cuda:0, as tensors report it
    outs, new = {}, {}
    for name in source.values():
        t = targets[name]
        want = loaded_dtype(name, reader.stored_dtype(name), dtype)
        if not t.is_meta and t.dtype == want and t.device == dev:
            outs[name] = t.detach()
        else:
            out = outs[name] = torch.empty(reader.shape(name), dtype=want, device=dev)
            new[id(t)] = nn.Parameter(out, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else out
    reader.read_into(outs)
    for module in model.modules():
        for slots in (module._parameters, module._buffers):
            for attr, old in list(slots.items()):
                if old is not None and id(old) in new:
                    slots[attr] = new[id(old)]
