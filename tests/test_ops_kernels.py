"""The CPU kernels of `kimi_k2.ops.kernels` (C++, built on first use) against their PyTorch reference: fp32, fp16 and
Q8_0 linears, plain and by expert id, at decode and batch widths; int8 rows independent of the batch; and a machine
without the kernels (no compiler, or switched off) served by the reference with a warning."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kimi_k2.ops import kernels
from kimi_k2.ops.quantize import quantize_int8

native = pytest.mark.skipif(not kernels.load(), reason="the C++ kernels cannot be built on this machine")
G = torch.Generator().manual_seed(0)


def _weights(fmt: str, *shape: int) -> tuple[torch.Tensor, ...]:
    w = torch.randn(*shape, generator=G) * shape[-1] ** -0.5
    return kernels.pack_q8(*quantize_int8(w)) if fmt == "int8" else (w.half() if fmt == "fp16" else w,)


def _run(fmt: str, x: torch.Tensor, w: tuple[torch.Tensor, ...], ids: torch.Tensor | None, native: bool
         ) -> torch.Tensor:
    if native:
        return {"fp32": kernels.linear_f32, "fp16": kernels.linear_f16, "int8": kernels.linear_q8}[fmt](x, *w, ids)
    if fmt == "int8":
        return kernels.linear_q8_reference(x, *w, ids)
    return kernels.linear_float_reference(x, *w, ids)


@native
@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 37])
def test_kernels_match_reference(fmt: str, rows: int) -> None:
    """Odd widths (N = 45, int8 N = 40: a partial register tile / chunk; K = 96: three Q8_0 blocks) on one weight, and
    on a stack [E, N, K] read by ids: runs of one expert (one product each), a single shared input row, every expert
    mixed, sorted or not (repeats and unsorted ids make runs of one row)."""
    n = 40 if fmt == "int8" else 45
    x = torch.randn(rows, 96, generator=G)
    w = _weights(fmt, n, 96)
    torch.testing.assert_close(_run(fmt, x, w, None, True), _run(fmt, x, w, None, False), rtol=1e-5, atol=1e-5)
    stack = _weights(fmt, 5, n, 96)
    unsorted = torch.randint(0, 5, (rows,), generator=G)
    for ids in (torch.sort(unsorted).values, unsorted):
        for xs in (x, x[:1]):
            torch.testing.assert_close(_run(fmt, xs, stack, ids, True), _run(fmt, xs, stack, ids, False), rtol=1e-5,
                                       atol=1e-5)


def test_q8_packing_round_trips_and_rejects_odd_rows() -> None:
    """`pack_q8` reorders each group of 8 rows (quants [block][4-weight chunk][row], scales [block][row]) and
    `unpack_q8` restores the row-major tensors exactly, stacks [E, N, K] included; a group is whole rows, so packs of
    row blocks concatenate into the pack of the concatenation (gate | up as one projection)."""
    q, d = quantize_int8(torch.randn(3, 24, 64, generator=G))
    pq, pd = kernels.pack_q8(q, d)
    assert pq.shape == q.shape and pd.shape == d.shape and not torch.equal(pq, q)
    # row 1 of group 0: chunk 0 holds its weights 0..3 at bytes 4..7, chunk 1 its weights 4..7 at bytes 36..39
    assert torch.equal(pq[0, 0, 4:8], q[0, 1, 0:4]) and torch.equal(pq[0, 0, 36:40], q[0, 1, 4:8])
    assert torch.equal(pd[0, 0, :2], torch.stack([d[0, 0, 0], d[0, 1, 0]]))
    uq, ud = kernels.unpack_q8(pq, pd)
    assert torch.equal(uq, q) and torch.equal(ud, d)
    gate, up = kernels.pack_q8(q[0, :16], d[0, :16]), kernels.pack_q8(q[0, 16:], d[0, 16:])
    assert torch.equal(torch.cat([gate[0], up[0]]), pq[0]) and torch.equal(torch.cat([gate[1], up[1]]), pd[0])
    with pytest.raises(ValueError, match="out_features divisible by 8"):
        kernels.pack_q8(*quantize_int8(torch.randn(12, 64)))


@native
def test_q8_rows_are_batch_invariant_and_q8_arithmetic() -> None:
    """A row's int8 result is the same (to fp32 rounding) alone, with 2 others (int8 products) or with 39 (the
    dequantized fp32 path), and equals the Q8_0 formula: quantized x times quantized W."""
    w = _weights("int8", 64, 128)
    x = torch.randn(40, 128, generator=G)
    alone = kernels.linear_q8(x[:1], *w)
    for batch in (2, 3, 5, 40):
        assert torch.equal(kernels.linear_q8(x[:batch], *w)[:1], alone)
    xq, xd = kernels.quantize_blocks(x[:1])
    torch.testing.assert_close(alone, kernels.dequantize_blocks(xq, xd) @ kernels.dequantize_blocks(
        *kernels.unpack_q8(*w)).t(), rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="expert id 7 out of"):
        kernels.linear_q8(x[:2], *_weights("int8", 3, 64, 128), torch.tensor([0, 7]))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernels.linear_q8(torch.randn(1, 40), torch.zeros(4, 40, dtype=torch.int8), torch.zeros(4, 1).half())
    with pytest.raises(RuntimeError, match="out_features divisible by 8"):
        kernels.linear_q8(torch.randn(1, 64), torch.zeros(12, 64, dtype=torch.int8), torch.zeros(12, 2).half())


_FALLBACK = """
import logging, torch
logging.basicConfig(level=logging.WARNING)
from kimi_k2.ops import kernels
from kimi_k2.ops.quantize import quantize_int8
w = kernels.pack_q8(*quantize_int8(torch.randn(16, 64)))
x = torch.randn(2, 64)
assert kernels.load() is False
torch.testing.assert_close(kernels.linear_q8(x, *w), kernels.linear_q8_reference(x, *w))
print("fallback ok")
"""


@pytest.mark.parametrize("env", [{"KIMI_K2_NO_KERNELS": "1"}, {"CXX": "no-such-compiler-xyz"}])
def test_without_kernels_the_reference_serves(tmp_path, env: dict[str, str]) -> None:
    """Kernels switched off, or no compiler (an empty cache dir, so nothing prebuilt is found): the ops run the
    PyTorch reference and a warning names why."""
    run_env = {**os.environ, "KIMI_K2_CACHE": str(tmp_path / "cache"), **env}
    proc = subprocess.run([sys.executable, "-c", _FALLBACK], capture_output=True, text=True, env=run_env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "fallback ok" in proc.stdout
    assert "CPU kernels unavailable" in proc.stderr
    assert next(iter(env)) in proc.stderr or "no C++ compiler" in proc.stderr


def test_unwritable_cache_falls_back_cleanly(tmp_path) -> None:
    """A cache path that cannot be created (a file in the way) is a warning and the reference, not a crash."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    run_env = {**os.environ, "KIMI_K2_CACHE": str(blocker / "cache")}
    proc = subprocess.run([sys.executable, "-c", _FALLBACK], capture_output=True, text=True, env=run_env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "CPU kernels unavailable" in proc.stderr
