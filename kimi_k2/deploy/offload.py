"""Serving a checkpoint larger than RAM: routed experts stay in the memory-mapped safetensors files (KTransformers-style
expert offload, shared/reference/serving_anchors.md §4) and are dequantized only when tokens are routed to them.

Everything else (embeddings, attention, dense MLP, router, shared expert, lm_head) is loaded normally. Routed experts
are ~97% of K2's bytes, so resident memory is the non-expert weights plus the experts of one step. After an expert's
fp8 bytes are dequantized its pages are dropped from this process (madvise MADV_DONTNEED; they stay in the kernel's
page cache, clean and reclaimable), so touched experts do not pile up in RSS. An optional LRU keeps the dequantized
weights of the most recently used experts. With `quantization` ("int8" / "fp16") the experts run on the same
low-precision linears as a quantized model (`kimi_k2.ops.quantize`), made from the fp8 bytes when first used, and the
LRU holds them in that format (1 or 2 bytes per weight).

Tensor bytes are located through the safetensors header (`kimi_k2.checkpoint.reader.read_header`).
"""

from __future__ import annotations

import mmap
import os
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kimi_k2.checkpoint import CheckpointError, CheckpointReader, dequantize_block_fp8, load_into
from kimi_k2.checkpoint.fp8 import FP8_DTYPE, SCALE_SUFFIX
from kimi_k2.checkpoint.reader import read_header
from kimi_k2.config import K2Config
from kimi_k2.model import K2ForCausalLM
from kimi_k2.model.functional import swiglu
from kimi_k2.model.moe import MoE
from kimi_k2.model.quantized import quantize_model
from kimi_k2.ops.quantize import QuantizedLinear

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
FAULT_MARGIN = 2 * 2**20  # x86-64 / arm64-4K PMD size: the largest page-cache folio and fault-around window
DTYPES = (torch.float8_e4m3fn, torch.bfloat16, torch.float16, torch.float32)


class MappedShard:
    """One safetensors file, memory-mapped read-only; tensors are zero-copy views of the mapping."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.entries = read_header(self.path)  # checked: every tensor's bytes lie inside the file
        try:
            with open(self.path, "rb") as f:
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot map safetensors file {self.path}: {e!r}") from e

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.entries:
            raise CheckpointError(f"tensor {name} is not in {self.path}")
        dtype, shape, begin, end = self.entries[name]
        if dtype not in DTYPES:
            raise CheckpointError(f"tensor {name} in {self.path} has dtype {dtype}; offload reads {DTYPES}")
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # the mapping is read-only and these views are never written
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            flat = torch.frombuffer(self.mm, dtype=torch.uint8, count=end - begin, offset=begin)
        if begin % dtype.itemsize:  # unaligned (safetensors does not promise alignment): copy, scales are small
            flat = flat.clone()
        return flat.view(dtype).view(shape)

    def release(self, name: str) -> None:
        """Drop this tensor's pages from the process (the next access faults them back in from the file).

        A read fault maps more than its page: the whole page-cache folio and Linux fault-around neighbours, both
        within the faulting address's 2 MiB PMD. So the range released is the tensor's plus FAULT_MARGIN each side.
        """
        _, _, begin, end = self.entries[name]
        start = max(0, begin - FAULT_MARGIN)
        start -= start % mmap.PAGESIZE
        end = min(len(self.mm), end + FAULT_MARGIN)
        if end > start:
            self.mm.madvise(mmap.MADV_DONTNEED, start, end - start)


class ExpertStore:
    """The memory-mapped shards of a checkpoint, and an LRU of dequantized experts shared by all layers."""

    def __init__(self, reader: CheckpointReader, dtype: torch.dtype, cache_experts: int = 0,
                 release_pages: bool = True, quantization: str | None = None) -> None:
        if cache_experts < 0:
            raise ValueError(f"cache_experts must be >= 0, got {cache_experts}")
        self.reader, self.dtype, self.quantization = reader, dtype, quantization
        self.cache_experts, self.release_pages = cache_experts, release_pages
        self.shards: dict[str, MappedShard] = {}
        self.lru: OrderedDict[str, tuple[torch.Tensor, ...]] = OrderedDict()
        self.dequantized = 0  # expert dequantizations so far (cache misses)

    def _shard(self, name: str) -> MappedShard:
        if name not in self.reader.weight_map:
            raise CheckpointError(f"tensor {name} is not in the checkpoint {self.reader.directory}")
        file = self.reader.weight_map[name]
        if file not in self.shards:
            self.shards[file] = MappedShard(self.reader.directory / file)
        return self.shards[file]

    def mapped(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight view, scale view or None) of one stored projection, checked against the header."""
        w = self._shard(name).tensor(name)
        if w.dtype != FP8_DTYPE:
            return w, None
        return w, self._shard(name + SCALE_SUFFIX).tensor(name + SCALE_SUFFIX)

    def weights(self, prefix: str) -> tuple[torch.Tensor, ...] | tuple[QuantizedLinear, ...]:
        """Dequantized (gate, up, down) of the expert whose tensors start with `prefix` (QuantizedLinears with
        `quantization`)."""
        if prefix in self.lru:
            self.lru.move_to_end(prefix)
            return self.lru[prefix]
        out = []
        for proj in PROJECTIONS:
            name = f"{prefix}{proj}.weight"
            w, scale = self.mapped(name)
            dtype = torch.float32 if self.quantization else self.dtype
            out.append(w.to(dtype, copy=True) if scale is None else
                       dequantize_block_fp8(w, scale, self.reader.block, dtype=dtype))
            if self.quantization:
                out[-1] = QuantizedLinear.from_float(out[-1], None, self.quantization)
            if self.release_pages:
                for n in (name, name + SCALE_SUFFIX) if scale is not None else (name,):
                    self._shard(n).release(n)
        self.dequantized += 1
        if self.cache_experts:
            self.lru[prefix] = tuple(out)
            if len(self.lru) > self.cache_experts:
                self.lru.popitem(last=False)
        return tuple(out)


class OffloadedExpert(nn.Module):
    """down(silu(gate(x)) * up(x)) with the three matrices read from the mapped checkpoint at each call."""

    def __init__(self, store: ExpertStore, prefix: str) -> None:
        super().__init__()
        self.store, self.prefix = store, prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.store.quantization:
            gate, up, down = self.store.weights(self.prefix)
            return down(swiglu(gate(x), up(x))).to(x.dtype)
        gate, up, down = (w.to(x.device) for w in self.store.weights(self.prefix))
        return F.linear(swiglu(F.linear(x, gate), F.linear(x, up)), down)


def offload_experts(model: K2ForCausalLM, store: ExpertStore) -> K2ForCausalLM:
    """Replace each routed expert of `model` by an `OffloadedExpert` over `store`, after checking its tensors."""
    for i, block in enumerate(model.model.layers):
        if not isinstance(block.mlp, MoE):
            continue
        for e, expert in enumerate(block.mlp.experts):
            prefix = f"model.layers.{i}.mlp.experts.{e}."
            for proj in PROJECTIONS:
                w, _ = store.mapped(f"{prefix}{proj}.weight")
                want = tuple(getattr(expert, proj).weight.shape)
                if tuple(w.shape) != want:
                    raise CheckpointError(f"shape mismatch for {prefix}{proj}.weight: checkpoint "
                                          f"{tuple(w.shape)}, model {want}")
            block.mlp.experts[e] = OffloadedExpert(store, prefix)
    return model


def load_offloaded(
    directory: str | os.PathLike[str], dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
    cache_experts: int = 0, release_pages: bool = True, quantization: str | None = None,
) -> K2ForCausalLM:
    """A model whose non-expert tensors are loaded (as `dtype`) and whose routed experts stay memory-mapped;
    with `quantization` every projection, resident or offloaded, is int8 / fp16 (the rest fp32)."""
    reader = CheckpointReader(directory)
    config = K2Config.from_pretrained(directory)
    with torch.device("meta"):
        model = K2ForCausalLM(config)
    offload_experts(model, ExpertStore(reader, dtype, cache_experts, release_pages, quantization))
    load_into(model, reader, torch.float32 if quantization else dtype, device, strict=False)
    return quantize_model(model, quantization) if quantization else model.eval()
