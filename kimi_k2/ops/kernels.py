"""PyTorch ops `kimi_k2::linear_f16` and `kimi_k2::linear_q8`: linears on fp16 / int8 weights for CPU inference.

The schemas, shapes (for torch.compile / export) and a PyTorch reference live here; the CPU kernels are C++
(`kernels.cpp`, AVX2 + FMA + F16C), compiled once per machine with the system's C++ compiler (the one inductor uses)
into `$KIMI_K2_CACHE` (default ~/.cache/kimi_k2) and loaded on first use. Without a compiler, or on a CPU without
AVX2, the reference runs instead (same formulas, slower) and a warning says so.

    linear_f16(x [M, K] fp32, w [N, K] fp16, ids=None) -> x w^T [M, N] fp32
    linear_q8(x, q [N, K] int8, d [N, K/32] fp16, ids=None) -> x (q * d)^T, q and d in the packed order of
        `pack_q8` (N a multiple of 8): llama.cpp's Q8_0 arithmetic: x is quantized per row in blocks of 32
        (d_x = amax / 127, x_q = round(x / d_x)), each block's int8 dot product is exact, then scaled by d_w * d_x,
        the same arithmetic at every batch size, so a row's result does not depend on the batch it is in.
    ids [M] int64: output row i uses expert ids[i] of stacked weights [E, N, K] / [E, N, K/32] (x has M rows or 1).

Why our own kernels (measured on the 2-core AVX2 box, one thread): FBGEMM's dynamic int8 / fp16 linears cost
~100-250 us per call at decode widths (k2-small's 256 x 576 projection: 245 us int8, 123 us fp16, against 23 us for
the fp32 BLAS and ~28 us here), `aten._weight_int8pack_mm` and fp16/bf16 `F.linear` were slower than fp32, and none
of them reads the routed experts by index from a stacked tensor, which the compiled decode needs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")
QK = 32  # int8 weights per scale (Q8_0 block)
RG = 8  # int8 weight rows interleaved by `pack_q8`

_LIB = torch.library.Library("kimi_k2", "DEF")
_LIB.define("linear_f32(Tensor x, Tensor w, Tensor? ids=None) -> Tensor")
_LIB.define("linear_f16(Tensor x, Tensor w, Tensor? ids=None) -> Tensor")
_LIB.define("linear_q8(Tensor x, Tensor q, Tensor d, Tensor? ids=None) -> Tensor")

_state: dict[str, object] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("KIMI_K2_CACHE") or Path.home() / ".cache" / "kimi_k2")


def _rows_out(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor | None) -> tuple[int, int]:
    return (x.shape[0] if ids is None else ids.shape[0]), w.shape[-2]


@torch.library.register_fake("kimi_k2::linear_f32")
def _linear_f32_fake(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(_rows_out(x, w, ids))


@torch.library.register_fake("kimi_k2::linear_f16")
def _linear_f16_fake(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(_rows_out(x, w, ids))


@torch.library.register_fake("kimi_k2::linear_q8")
def _linear_q8_fake(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, ids: torch.Tensor | None = None
                    ) -> torch.Tensor:
    return x.new_empty(_rows_out(x, q, ids))


# ---- reference (the kernels' formulas in PyTorch; the fallback without a compiler) --------------------------------
def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (int8 [..., K], fp32 scales [..., K/32]): per 32 values d = amax / 127, q = round(x / d)."""
    blocks = x.float().unflatten(-1, (-1, QK))
    d = blocks.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (blocks * inv[..., None]).round().to(torch.int8).flatten(-2), d


def dequantize_blocks(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """int8 [..., K] and scales [..., K/32] -> fp32 [..., K]."""
    return (q.float().unflatten(-1, (-1, QK)) * d.float()[..., None]).flatten(-2)


def pack_q8(q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major Q8_0 (q int8 [..., N, K], d [..., N, K/32]) -> the same shapes in the kernel's packed order.

    Rows go in groups of RG = 8: a group's quants are ordered [block b][chunk c][row r][weights 4c..4c+3 of block b]
    (one 32-byte load holds 4 weights of each of its 8 rows) and its scales [block b][row r]. Groups stay whole rows
    of the tensor, so packs concatenate and stack along rows (`kimi_k2.ops.layout.pack_rows`) like row-major ones.
    """
    *lead, N, K = q.shape
    if N % RG or K % QK:
        raise ValueError(f"packed int8 weights need out_features divisible by {RG} and in_features by {QK}, "
                         f"got {N} x {K}")
    nb = K // QK
    packed = q.reshape(*lead, N // RG, RG, nb, QK // 4, 4).movedim(-4, -2).reshape(*lead, N, K)
    return packed.contiguous(), d.reshape(*lead, N // RG, RG, nb).transpose(-1, -2).reshape(*lead, N, nb).contiguous()


def unpack_q8(q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `pack_q8`: packed (q, d) -> row-major."""
    *lead, N, K = q.shape
    nb = K // QK
    rows = q.reshape(*lead, N // RG, nb, QK // 4, RG, 4).movedim(-2, -4).reshape(*lead, N, K)
    return rows, d.reshape(*lead, N // RG, nb, RG).transpose(-1, -2).reshape(*lead, N, nb)


def _expert_weights(w: torch.Tensor, rows: int, ids: torch.Tensor | None) -> torch.Tensor:
    return w.expand(rows, *w.shape) if ids is None else w[ids]  # [M, N, K]


def linear_float_reference(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    if ids is None:
        return x @ w.float().t()
    return (_expert_weights(w.float(), len(ids), ids) @ x.expand(len(ids), -1)[:, :, None])[..., 0]


def linear_q8_reference(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, ids: torch.Tensor | None = None
                        ) -> torch.Tensor:
    xs = dequantize_blocks(*quantize_blocks(x.expand(x.shape[0] if ids is None else len(ids), -1)))
    w = dequantize_blocks(*unpack_q8(q, d))
    if ids is None:
        return xs @ w.t()
    return (w[ids] @ xs[:, :, None])[..., 0]


# ---- the C++ kernels --------------------------------------------------------------------------------------------
def _compile_command(out: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    torch_lib = Path(torch.__file__).parent / "lib"
    cxx = os.environ.get("CXX", "g++")
    return [cxx, "-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-DNDEBUG",
            *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}", str(SOURCE),
            f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-lgomp", f"-Wl,-rpath,{torch_lib}", "-o", str(out)]


def library_path() -> Path:
    """Where the built library lives: keyed by the source, the torch version and the compiler."""
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(
        _compile_command(Path("x"))).encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"kimi_k2_kernels-{key}.so"


def build() -> Path:
    """Compile kernels.cpp unless the cached library exists -> its path (raises RuntimeError on failure)."""
    path = library_path()
    if path.is_file():
        return path
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx}) on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        proc = subprocess.run(_compile_command(out), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{proc.stderr[-2000:]}")
        os.replace(out, path)  # atomic: a concurrent build of the same key writes the same bytes
    return path


def _cpu_supported() -> bool:
    return sys.platform == "linux" and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def load() -> bool:
    """Make the ops' CPU implementations available (once per process) -> True if they are the C++ kernels."""
    if "native" in _state:
        return bool(_state["native"])
    native = False
    if os.environ.get("KIMI_K2_NO_KERNELS"):
        why = "KIMI_K2_NO_KERNELS is set"
    elif not _cpu_supported():
        why = f"the CPU kernels need x86 Linux with AVX2 (this CPU: {torch.backends.cpu.get_cpu_capability()})"
    else:
        try:
            torch.ops.load_library(str(build()))
            native, why = True, ""
        except (RuntimeError, OSError) as e:
            why = str(e)
    if not native:
        log.warning("CPU kernels unavailable, low-precision linears use the PyTorch reference (slower): %s", why)
        _LIB.impl("linear_f32", linear_float_reference, "CPU")
        _LIB.impl("linear_f16", linear_float_reference, "CPU")
        _LIB.impl("linear_q8", linear_q8_reference, "CPU")
    _state["native"] = native
    return native


def _ops() -> object:
    """torch.ops.kimi_k2, its CPU implementations loaded (call `load` eagerly before torch.compile traces a caller)."""
    if "native" not in _state:
        load()
    return torch.ops.kimi_k2


def linear_f32(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    return _ops().linear_f32(x, w, ids)


def linear_f16(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    return _ops().linear_f16(x, w, ids)


def linear_q8(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    return _ops().linear_q8(x, q, d, ids)
