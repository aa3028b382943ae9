"""Lazy reading of Hugging Face safetensors checkpoints (single file or sharded with an index), block-FP8 and
compressed-tensors INT4 aware: a quantized weight is one logical tensor `X.weight`, dequantized when read.

Only safetensors headers are read up front; tensor data is read shard by shard, tensor by tensor, through
`safetensors.safe_open`, so loading never holds more than one tensor of the checkpoint beyond the model itself.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from kimi_k2.checkpoint import int4
from kimi_k2.checkpoint.fp8 import FP8_DTYPE, SCALE_SUFFIX, dequantize_block_fp8, scale_shape
from kimi_k2.config import check_quantization_config

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


class TensorEntry(NamedTuple):
    """One tensor of a safetensors file: its dtype, shape and data bytes [begin, end) as offsets in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class Int4Entry(NamedTuple):
    """A compressed-tensors INT4 weight: where its three stored tensors are, and the logical [out, in] shape."""

    packed: str
    scale: str
    shape: tuple[int, int]


class Slice(NamedTuple):
    """The part [start, stop) along `dim` of a tensor that a model holds (tensor parallelism)."""

    dim: int
    start: int
    stop: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Tensor name -> TensorEntry from a safetensors file: u64 little-endian header length n, n bytes of JSON
    {name: {dtype, shape, data_offsets: [b, e]}}, then the data area; a tensor's bytes are [8 + n + b, 8 + n + e).

    The data area must be exactly covered by the tensors, back to back (as `safetensors` requires): a file cut
    short (an interrupted copy or download) or with bytes missing is named here rather than failing on first read.
    """
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            size = os.fstat(f.fileno()).st_size
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        entries = {k: _entry(v, 8 + n) for k, v in header.items() if k != "__metadata__"}
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"unreadable safetensors file {path}: {e!r}") from e
    pos = 8 + n
    for name, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if not 8 + n <= e.begin <= e.end <= size:
            raise CheckpointError(f"tensor {name} lies outside {path} (bytes {e.begin}..{e.end} of {size}): the file "
                                  f"is truncated or corrupt")
        if e.end - e.begin != _nbytes(e.dtype, e.shape):
            raise CheckpointError(f"tensor {name} in {path}: {e.end - e.begin} bytes for {e.dtype} {list(e.shape)}")
        if e.begin != pos:
            raise CheckpointError(f"{path}: tensor {name} starts at byte {e.begin}, expected {pos} (tensors overlap "
                                  f"or leave a gap): the file is corrupt")
        pos = e.end
    if pos != size:
        raise CheckpointError(f"{path} has {size - pos} bytes after its last tensor: the file is corrupt")
    return entries


def _entry(raw: dict[str, Any], data_start: int) -> TensorEntry:
    shape, (begin, end) = tuple(raw["shape"]), raw["data_offsets"]
    if not all(isinstance(x, int) and x >= 0 for x in (*shape, begin, end)):
        raise ValueError(f"shape {list(shape)} and data_offsets {[begin, end]} must be non-negative integers")
    return TensorEntry(_DTYPES[raw["dtype"]], shape, data_start + begin, data_start + end)


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
        self.info: dict[str, TensorEntry] = {}
        for name, shard in self.weight_map.items():
            if name not in headers[shard]:
                raise CheckpointError(f"tensor {name} is mapped to shard {shard} by {index}, but is not in it")
            self.info[name] = headers[shard][name]
        quantization = _quantization_config(self.directory / "config.json")
        self.block = _block_size(quantization, self.directory / "config.json")
        self.int4_group = 0  # compressed-tensors group_size, when the checkpoint holds INT4 weights
        self.int4: dict[str, Int4Entry] = self._find_int4(quantization)
        companions = {e.scale for e in self.int4.values()} | {name + "_shape" for name in self.int4}
        self.names = []
        for n in self.weight_map:
            if n.endswith(IGNORED_SUFFIXES) or self._is_scale_of_fp8(n) or n in companions:
                continue
            self.names.append(n.removesuffix("_packed") if n.endswith(".weight_packed") else n)
        self._name_set = set(self.names)
        self._by_shard: dict[str, list[str]] = {shard: [] for shard in self.shards}
        for name in self.names:
            self._by_shard[self.weight_map[self.int4[name].packed if name in self.int4 else name]].append(name)
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
        return self.int4[name].shape if name in self.int4 else self.info[name].shape

    def stored_dtype(self, name: str) -> torch.dtype:
        """As stored; an INT4 weight reports its scales' dtype (what it dequantizes to by default)."""
        return self.info[self.int4[name].scale if name in self.int4 else name].dtype

    def is_int4(self, name: str) -> bool:
        return name in self.int4

    def is_fp8(self, name: str) -> bool:
        return self.stored_dtype(name) == FP8_DTYPE

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data as stored (fp8 weights and their scales included)."""
        return sum(e.end - e.begin for e in self.info.values())

    def names_in(self, shard: str) -> list[str]:
        return self._by_shard[shard]

    # ---- data -------------------------------------------------------------------------------------
    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, dequantized if block-FP8, in the dtype `loaded_dtype` gives."""
        if name not in self:
            raise CheckpointError(f"tensor {name} is not in the checkpoint {self.directory}")
        (_, _, t), = self._walk({name}, dtype)
        return t

    def get_fp8(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A block-FP8 weight as stored: (e4m3 [N, K], fp32 scale_inv [ceil(N/bn), ceil(K/bk)]), not dequantized."""
        if name not in self or not self.is_fp8(name):
            raise CheckpointError(f"tensor {name} is not a block-FP8 weight of the checkpoint {self.directory}")
        with self._open(self.weight_map[name]) as f:
            return f.get_tensor(name).clone(), self._scale(f, self.weight_map[name], name).float().clone()

    def tensors(
        self, dtype: torch.dtype | None = None, names: set[str] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every logical tensor (or those in `names`), one shard open at a time."""
        for _, name, t in self._walk(names, dtype):
            yield name, t

    def stored_int4(self, name: str) -> dict[str, torch.Tensor]:
        """The three stored tensors of INT4 weight `name` as they are in the files (`X.weight_packed`, ...)."""
        e = self.int4[name]
        out = {}
        for stored in (e.packed, e.scale, name + "_shape"):
            with self._open(self.weight_map[stored]) as f:
                out[stored] = f.get_tensor(stored).clone()
        return out

    def read_into(self, outs: dict[str, torch.Tensor], parts: Mapping[str, Slice] | None = None) -> None:
        """Copy (dequantizing, casting) each named tensor into the preallocated `outs[name]`, shard by shard.

        parts: name -> Slice: `outs[name]` receives only that part, and only its bytes are read (for block-FP8, the
        whole 128-row/column blocks that hold it).
        """
        for _ in self._walk(set(outs), None, outs, parts or {}):
            pass

    def part_shape(self, name: str, part: Slice) -> tuple[int, ...]:
        """The shape of `part` of tensor `name`, checked against the tensor's shape."""
        shape = list(self.shape(name))
        dim, start, stop = part
        if not (0 <= dim < len(shape) and 0 <= start < stop <= shape[dim]):
            raise CheckpointError(f"slice {start}:{stop} of dim {dim} is outside {name} {tuple(shape)}")
        shape[dim] = stop - start
        return tuple(shape)

    def _walk(
        self, names: set[str] | None, dtype: torch.dtype | None, outs: dict[str, torch.Tensor] | None = None,
        parts: Mapping[str, Slice] | None = None,
    ) -> Iterator[tuple[str, str, torch.Tensor]]:
        for shard in self.shards:
            todo = [n for n in self.names_in(shard) if names is None or n in names]
            if not todo:
                continue
            with self._open(shard) as f, open(self.directory / shard, "rb", buffering=0) as raw:
                for name in todo:
                    # allocated before the temporaries of dequantization, so those are freed from the top of the
                    # heap (allocating them first fragmented glibc's heap and doubled the RSS of a model load)
                    out = outs[name] if outs is not None else torch.empty(
                        self.shape(name), dtype=loaded_dtype(name, self.stored_dtype(name), dtype))
                    part = parts.get(name) if parts else None
                    try:
                        t = self._read(f, raw, shard, name, out) if part is None else \
                            self._read_part(f, shard, name, out, part)
                    except (SafetensorError, OSError) as e:
                        raise CheckpointError(f"cannot read tensor {name} from {self.directory / shard}: {e}") from e
                    yield shard, name, t

    @contextmanager
    def _open(self, shard: str) -> Iterator[Any]:
        try:
            f = safe_open(self.directory / shard, framework="pt")
        except (SafetensorError, OSError) as e:  # e.g. the file changed after its header was checked
            raise CheckpointError(f"unreadable safetensors file {self.directory / shard}: {e}") from e
        with f:
            yield f

    def _read(self, f: Any, raw: BinaryIO, shard: str, name: str, out: torch.Tensor) -> torch.Tensor:
        if name in self.int4:
            e = self.int4[name]
            return int4.dequantize_int4(self._pread(raw, e.packed), self._companion(f, shard, e.scale), e.shape,
                                        self.int4_group, out=out)
        entry = self.info[name]
        if entry.dtype == FP8_DTYPE:
            return dequantize_block_fp8(self._pread(raw, name), self._scale(f, shard, name), self.block, out=out)
        if out.dtype == entry.dtype and out.device.type == "cpu" and out.is_contiguous():
            return self._pread(raw, name, out)
        return out.copy_(self._pread(raw, name))

    def _pread(self, raw: BinaryIO, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Stored tensor `name` read from the open shard `raw` with pread into `out` (or a new tensor): not through
        the shard's mmap, whose pages would stay in the process's RSS until the shard is closed (a second copy of
        every weight read from it, at the peak)."""
        e = self.info[name]
        if out is None:
            out = torch.empty(e.shape, dtype=e.dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        done = 0
        while done < len(view):
            n = os.preadv(raw.fileno(), [view[done:]], e.begin + done)
            if n <= 0:
                raise CheckpointError(f"{self.directory / self.weight_map[name]} ends inside tensor {name}: the file "
                                      f"changed after its header was read")
            done += n
        return out

    def _read_part(self, f: Any, shard: str, name: str, out: torch.Tensor, part: Slice) -> torch.Tensor:
        dim, start, stop = part
        if name in self.int4:  # rows: just those rows' words and scales; columns: whole rows, then narrowed
            e = self.int4[name]
            scale = self._companion(f, shard, e.scale)
            if dim == 0:
                w = int4.dequantize_int4(f.get_slice(e.packed)[start:stop], scale[start:stop],
                                         (stop - start, e.shape[1]), self.int4_group)
                return out.copy_(w)
            w = int4.dequantize_int4(f.get_tensor(e.packed), scale, e.shape, self.int4_group)
            return out.copy_(w.narrow(dim, start, stop - start))
        if not self.is_fp8(name):
            return out.copy_(f.get_slice(name)[_index(dim, start, stop)])
        b = self.block[dim]
        first, last = start // b, -(-stop // b)  # the scale blocks that hold rows (or columns) start..stop
        t = f.get_slice(name)[_index(dim, first * b, min(last * b, self.shape(name)[dim]))]
        scale = self._scale(f, shard, name)[_index(dim, first, last)]
        w = dequantize_block_fp8(t, scale, self.block, dtype=torch.float32)
        return out.copy_(w.narrow(dim, start - first * b, stop - start))

    def _companion(self, f: Any, shard: str, name: str) -> torch.Tensor:
        """Tensor `name` (a scale) from the open shard `f`, or from its own shard when it lives in another one."""
        if self.weight_map[name] == shard:
            return f.get_tensor(name)
        with self._open(self.weight_map[name]) as g:
            return g.get_tensor(name)

    def _scale(self, f: Any, shard: str, name: str) -> torch.Tensor:
        scale_name = name + SCALE_SUFFIX
        scale = self._companion(f, shard, scale_name)
        if not torch.isfinite(scale).all():
            raise CheckpointError(f"{scale_name} has inf/nan entries")
        return scale

    # ---- checks -----------------------------------------------------------------------------------
    def _find_int4(self, quantization: dict) -> dict[str, Int4Entry]:
        """The INT4 weights: each `X.weight_packed` with its `X.weight_scale` and `X.weight_shape`, checked against
        each other and against config.json's compressed-tensors quantization_config (read: the shape vectors)."""
        where = f"checkpoint {self.directory}"
        packed = [n for n in self.weight_map if n.endswith(".weight_packed")]
        if bad := [n for n in self.weight_map if n.endswith(int4.UNSUPPORTED_SUFFIXES)]:
            raise CheckpointError(f"{where} has {bad[0]}: asymmetric (zero point) or activation-ordered (g_idx) INT4 "
                                  f"is not supported, only symmetric group quantization")
        if not packed:
            return {}
        if quantization.get("quant_method") != "compressed-tensors":
            raise CheckpointError(f"{where} holds INT4 weights ({packed[0]}) but its config.json has no "
                                  f"compressed-tensors quantization_config")
        try:
            self.int4_group = check_quantization_config(quantization)
        except ValueError as e:
            raise CheckpointError(f"{self.directory / 'config.json'}: {e}") from None
        shapes: dict[str, torch.Tensor] = {}
        by_shard: dict[str, list[str]] = {}
        for p in packed:
            base = p.removesuffix("_packed")
            if base in self.weight_map:
                raise CheckpointError(f"{where} holds {base} both unquantized and as INT4 {p}")
            for companion in (base + "_scale", base + "_shape"):
                if companion not in self.weight_map:
                    raise CheckpointError(f"INT4 weight {p} has no {companion} in the {where}")
            by_shard.setdefault(self.weight_map[base + "_shape"], []).append(base + "_shape")
        for shard, names in by_shard.items():
            with self._open(shard) as f:
                shapes.update((n, f.get_tensor(n)) for n in names)
        out = {}
        for p in packed:
            base = p.removesuffix("_packed")
            raw = shapes[base + "_shape"]
            if raw.dtype.is_floating_point or raw.shape != (2,) or int(raw.min()) < 1:
                raise CheckpointError(f"{base}_shape must hold two positive integers [out, in], got {raw.tolist()}")
            shape = (int(raw[0]), int(raw[1]))
            scale = base + "_scale"
            want_p, want_s = (shape[0], -(-shape[1] // int4.PACK)), int4.scale_shape(shape, self.int4_group)
            if self.info[p].dtype != torch.int32 or self.info[p].shape != want_p:
                raise CheckpointError(f"{p} is {self.info[p].dtype} {list(self.info[p].shape)}; weight_shape "
                                      f"{list(shape)} needs int32 {list(want_p)}")
            if not self.info[scale].dtype.is_floating_point or self.info[scale].shape != want_s:
                raise CheckpointError(f"{scale} is {self.info[scale].dtype} {list(self.info[scale].shape)}; weight "
                                      f"{list(shape)} with group_size {self.int4_group} needs float {list(want_s)}")
            out[base] = Int4Entry(p, scale, shape)  # base: the logical name X.weight
        return out

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


def _quantization_config(config_file: Path) -> dict:
    """config.json's quantization_config ({} when the file or the entry is absent)."""
    try:
        q = json.loads(config_file.read_text()).get("quantization_config") or {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"unreadable {config_file}: {e}") from e
    if not isinstance(q, dict):
        raise CheckpointError(f"{config_file}: quantization_config must be an object")
    return q


def _block_size(q: dict, config_file: Path) -> tuple[int, int]:
    """weight_block_size from config.json's quantization_config, (128, 128) when absent."""
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{config_file}: weight_block_size {block!r} is not two positive ints")
    return block[0], block[1]


def _index(dim: int, start: int, stop: int) -> tuple[slice, ...]:
    """The indexing tuple that takes [start, stop) along `dim`."""
    return (slice(None),) * dim + (slice(start, stop),)


def name_list(names: list[str], n: int = 20) -> str:
    """The first `n` names, and how many more there are (for error messages)."""
    return str(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n
