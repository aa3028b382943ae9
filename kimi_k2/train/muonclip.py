"""MuonClip (Kimi K2 tech report, arXiv 2507.20534, Algorithm 1): Muon on hidden matrices, AdamW on the rest, in one
optimizer, then QK-Clip on the attention weights using the max logits recorded in this step's forward.

Muon group (`use_muon=True`), per matrix W [A, B] with gradient G:
    M_t = mu * M_{t-1} + (1 - mu) * G_t                  (EMA momentum, as torch.optim.Muon / KellerJordan/Muon)
    U_t = (1 - mu) * G_t + mu * M_t  if nesterov else M_t
    O_t = NS5(U_t)                                       (quintic Newton-Schulz: sigma/|U|_F >= 0.02 -> [0.68, 1.13])
    W_t = W_{t-1} * (1 - lr * wd) - lr * 0.2 * sqrt(max(A, B)) * O_t     (Moonlight eq. 4: AdamW-matched RMS 0.2)
K2's Algorithm 1 writes the plain sum M_t = mu M_{t-1} + G_t; it is (1 - mu)^-1 times the EMA, and NS normalises its
input by the Frobenius norm, so both give the same update.

`block_rows=R` orthogonalises each R-row block of a matrix separately (per-head Muon on q_b_proj / kv_b_proj, as in
torchtitan's Kimi recipe); the RMS match then uses the block shape [R, B]. 3-D parameters [E, A, B] (stacked experts)
are E independent matrices. Matrices of a group with the same [min, max] shape go through NS as one batch.

FSDP2-sharded parameters (DTensors, rows split over ranks): momentum, weight decay, the update and the AdamW group
work on each rank's rows; NS runs on each whole matrix once, on an owner rank (`kimi_k2.train.dist_muon`), with the
same arithmetic as one process.

NS runs in `ns_dtype`: KellerJordan/Muon and torch.optim.Muon use bfloat16 (fast on GPU); on CPU bf16 matmuls are
slower than fp32 and fp32 is more accurate, so float32 is the default here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from kimi_k2.train.dist_muon import Matrix, NSStats, orthogonalize_buckets, orthogonalize_sharded
from kimi_k2.train.qk_clip import QKClip, QKClipStats

# KellerJordan/Muon `zeropower_via_newtonschulz5`: f(x) = a x + b x^3 + c x^5, maximal slope at 0, non-convergent
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(
    G: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Approximate U V^T of G = U S V^T for each matrix of G [..., A, B]; returns [..., A, B] in `dtype`."""
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix, got shape {tuple(G.shape)}")
    a, b, c = coefficients
    X = G.to(dtype)
    wide = G.size(-2) > G.size(-1)
    if wide:
        X = X.mT  # iterate on the [min, max] orientation: the Gram matrix X X^T is min x min
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # Frobenius norm >= spectral norm, so sigma <= 1
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])  # [n, min, max]
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    X = X.view(shape)
    return X.mT if wide else X


class MuonClip(torch.optim.Optimizer):
    """Muon + AdamW in one optimizer (groups flagged `use_muon`), with optional QK-Clip after each step.

    Group options: lr, weight_decay (both kinds); momentum, nesterov, ns_steps, ns_coefficients, ns_eps, ns_dtype,
    block_rows (Muon); betas, eps (AdamW). Build the groups for a K2 model with `kimi_k2.train.param_groups`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 2e-4,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        ns_eps: float = 1e-7,
        ns_dtype: torch.dtype = torch.float32,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        use_muon: bool = True,
        block_rows: int | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
            ns_coefficients=tuple(ns_coefficients), ns_eps=ns_eps, ns_dtype=ns_dtype, betas=tuple(betas), eps=eps,
            use_muon=use_muon, block_rows=block_rows,
        )
        super().__init__(params, defaults)
        self.qk_clip: QKClip | None = None
        self.qk_clip_stats: QKClipStats | None = None
        self.ns_stats = NSStats()  # what Newton-Schulz did on this rank in the last step

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_group(len(self.param_groups) - 1, self.param_groups[-1])

    def attach_qk_clip(self, model: nn.Module, tau: float = 100.0, group: dist.ProcessGroup | None = None) -> QKClip:
        """Turn on max-logit tracking in `model`'s attention and clip after every `step()` (stats: `qk_clip_stats`)."""
        self.qk_clip = QKClip(model, tau, group)
        self.qk_clip.enable()
        return self.qk_clip

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.ns_stats = NSStats()
        muon = [g for g in self.param_groups if g["use_muon"]]
        if any(isinstance(p, DTensor) for g in muon for p in g["params"]):
            self._sharded_muon_step(muon)
        else:
            for group in muon:
                self._muon_step(group)
        for group in self.param_groups:
            if not group["use_muon"]:
                self._adamw_step(group)
        if self.qk_clip is not None:
            self.qk_clip_stats = self.qk_clip.apply()
        return loss

    def _momentum(self, group: dict[str, Any]) -> list[Matrix]:
        """Update the momentum of the group's parameters that have a gradient -> their NS inputs (local rows)."""
        mu, out = group["momentum"], []
        key = (group["ns_steps"], group["ns_coefficients"], group["ns_eps"], group["ns_dtype"])
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf, g = _local(state["momentum_buffer"]), _local(p.grad)
            buf.lerp_(g, 1 - mu)
            u = g.lerp(buf, mu) if group["nesterov"] else buf
            out.append(Matrix(p, u, p.shape, group["block_rows"], key))
        return out

    @staticmethod
    def _apply(group: dict[str, Any], m: Matrix, o: Tensor) -> None:
        """W <- W (1 - lr wd) - lr 0.2 sqrt(max(A, B)) O, with [A, B] the (block) matrix shape."""
        lr, wd = group["lr"], group["weight_decay"]
        _, rows, cols = m.blocks
        p = _local(m.param)
        p.mul_(1 - lr * wd)
        p.add_(o.reshape(p.shape), alpha=-lr * (0.2 * math.sqrt(max(rows, cols))))

    def _muon_step(self, group: dict[str, Any]) -> None:
        # NS works on the wide orientation [min, max]; matrices of one such shape go through it as one batch
        # (e.g. every expert's gate/up [I, D] and down [D, I]^T)
        matrices = self._momentum(group)
        t0, c0 = time.perf_counter(), time.process_time()
        outs = orthogonalize_buckets([(m.u, m) for m in matrices], _newton_schulz)
        self.ns_stats.ns_seconds += time.perf_counter() - t0
        self.ns_stats.ns_cpu_seconds += time.process_time() - c0
        self.ns_stats.matrices += sum(m.blocks[0] for m in matrices)
        for m, o in zip(matrices, outs, strict=True):
            self._apply(group, m, o)

    def _sharded_muon_step(self, groups: list[dict[str, Any]]) -> None:
        """Muon on FSDP2-sharded (DTensor) parameters: momentum and the update on the local rows, NS of each whole
        matrix once, by its owner rank (`dist_muon`)."""
        per_group = [(g, self._momentum(g)) for g in groups]
        matrices = [m for _, ms in per_group for m in ms]
        outs = iter(orthogonalize_sharded(matrices, _newton_schulz, self.ns_stats))
        for group, ms in per_group:
            for m in ms:
                self._apply(group, m, next(outs))

    def _adamw_step(self, group: dict[str, Any]) -> None:
        # the arithmetic of torch.optim.AdamW's single-tensor path, op for op (on the local rows of a sharded tensor)
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for param in group["params"]:
            if param.grad is None:
                continue
            p, g = _local(param), _local(param.grad)
            state = self.state[param]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(param)
                state["exp_avg_sq"] = torch.zeros_like(param)
            state["step"] += 1
            t, m, v = state["step"], _local(state["exp_avg"]), _local(state["exp_avg_sq"])
            p.mul_(1 - lr * wd)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))


def _local(t: Tensor) -> Tensor:
    """The tensor the arithmetic runs on: a DTensor's local rows (elementwise ops need no communication)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _newton_schulz(U: Tensor, key: tuple) -> Tensor:
    steps, coefficients, eps, dtype = key
    return zeropower_via_newtonschulz5(U, steps, coefficients, eps, dtype)


def _check_group(i: int, group: dict[str, Any]) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"MuonClip param group {i}: {msg}")

    need(group["lr"] >= 0, f"lr must be >= 0, got {group['lr']}")
    need(group["weight_decay"] >= 0, f"weight_decay must be >= 0, got {group['weight_decay']}")
    need(isinstance(group["use_muon"], bool), f"use_muon must be a bool, got {group['use_muon']!r}")
    if not group["use_muon"]:
        need(len(group["betas"]) == 2 and all(0 <= b < 1 for b in group["betas"]),
             f"betas must be two values in [0, 1), got {group['betas']}")
        need(group["eps"] > 0, f"eps must be > 0, got {group['eps']}")
        return
    need(0 <= group["momentum"] < 1, f"momentum must be in [0, 1), got {group['momentum']}")
    steps = group["ns_steps"]
    need(isinstance(steps, int) and steps >= 1, f"ns_steps must be an int >= 1, got {steps!r}")
    need(len(group["ns_coefficients"]) == 3, f"ns_coefficients must be (a, b, c), got {group['ns_coefficients']}")
    need(group["ns_dtype"].is_floating_point, f"ns_dtype must be a float dtype, got {group['ns_dtype']}")
    rows = group["block_rows"]
    need(rows is None or (isinstance(rows, int) and rows > 0), f"block_rows must be a positive int, got {rows!r}")
    names = group.get("names") or [f"#{j}" for j in range(len(group["params"]))]
    for name, p in zip(names, group["params"], strict=True):
        need(p.ndim in (2, 3), f"Muon param {name} has shape {tuple(p.shape)}; Muon needs a 2-D matrix or a 3-D stack "
                               "of matrices (put embeddings, lm_head, norms and biases in a use_muon=False group)")
        need(rows is None or p.shape[-2] % rows == 0,
             f"Muon param {name} has {p.shape[-2]} rows, not a multiple of block_rows={rows}")
