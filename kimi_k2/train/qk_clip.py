"""QK-Clip for MLA (Kimi K2 tech report, arXiv 2507.20534 §2.1 and Algorithm 1).

After the optimizer step, with S^h_max the largest pre-softmax logit of head h in this step's forward (the attention
records it when `track_max_logits` is set), every head with S^h_max > tau gets gamma_h = tau / S^h_max and
    q_nope rows (q_b_proj, or q_proj without q_lora)  *= sqrt(gamma_h)
    k_nope rows (kv_b_proj)                           *= sqrt(gamma_h)
    q_rope rows (q_b_proj / q_proj)                   *= gamma_h
The logit is softmax_scale * (q_nope . k_nope + q_rope . k_rope), so it scales by exactly gamma_h and S^h_max lands on
tau. The shared rotary key (kv_a_proj_with_mqa's k_pe rows) and the v rows of kv_b_proj are left alone.
Row layouts: q_b_proj out = per head [q_nope (qk_nope_head_dim) | q_rope (qk_rope_head_dim)];
             kv_b_proj out = per head [k_nope (qk_nope_head_dim) | v (v_head_dim)].
Under FSDP2 the weights are row-sharded DTensors: the factors are per row, so each rank scales the rows it holds (a
head's rows may straddle two ranks), on the fp32 master shards; S^h_max is first max-reduced over the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kimi_k2.parallel.fsdp import local_rows


@dataclass
class QKClipStats:
    layers: list[str]  # attention module names
    max_logits: Tensor  # [L, H] fp32: S^h_max seen in the step, before clipping
    gamma: Tensor  # [L, H] fp32: factor the head's logits were scaled by (1 = untouched)

    @property
    def heads_clipped(self) -> Tensor:  # [L] int64
        return (self.gamma < 1).sum(dim=-1)

    def as_dict(self) -> dict[str, float]:
        """Flat scalars for a logger: overall and per-layer max logit and clipped-head count."""
        out = {"qk_clip/max_logit": self.max_logits.max().item(),
               "qk_clip/heads_clipped": float(self.heads_clipped.sum().item())}
        for name, s, n in zip(self.layers, self.max_logits.amax(dim=-1).tolist(), self.heads_clipped.tolist(),
                              strict=True):
            out[f"qk_clip/{name}/max_logit"] = s
            out[f"qk_clip/{name}/heads_clipped"] = float(n)
        return out


class QKClip:
    """Per-head QK-Clip bound to a model whose attention modules have `track_max_logits` / `max_logits`.

    Call `enable()` once; then after each optimizer step `apply()`. With gradient accumulation call `record()` after
    every micro-batch forward: it keeps the running per-head max (the attention keeps only its last forward's).
    Under torch.distributed, `apply()` takes the max over the ranks of `group` (default: all) first.
    """

    def __init__(self, model: nn.Module, tau: float = 100.0, group: dist.ProcessGroup | None = None) -> None:
        if not tau > 0:
            raise ValueError(f"QK-Clip tau must be > 0, got {tau}")
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError(f"QK-Clip needs model.config (head sizes); {type(model).__name__} has none")
        self.tau = float(tau)
        self.group = group  # data-parallel ranks: their maxima are combined so every replica clips alike
        self.n_heads = config.num_attention_heads
        self.d_nope, self.d_rope, self.d_v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.layers = [(name, m) for name, m in model.named_modules() if hasattr(m, "track_max_logits")]
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no attention module with a track_max_logits attribute")
        for name, attn in self.layers:
            self._q_weight(name, attn)
            self._kv_weight(name, attn)
        self._running: list[Tensor | None] = [None] * len(self.layers)

    def enable(self) -> None:
        for _, attn in self.layers:
            attn.track_max_logits = True

    def disable(self) -> None:
        for _, attn in self.layers:
            attn.track_max_logits = False

    def record(self) -> None:
        """Fold each attention's last `max_logits` into the running per-head max, and consume it."""
        for i, (name, attn) in enumerate(self.layers):
            s = getattr(attn, "max_logits", None)
            if s is None:
                continue
            if s.shape != (self.n_heads,):
                raise ValueError(f"{name}.max_logits has shape {tuple(s.shape)}, expected ({self.n_heads},)")
            s = s.detach().float()
            self._running[i] = s.clone() if self._running[i] is None else torch.maximum(self._running[i], s)
            attn.max_logits = None

    @torch.no_grad()
    def apply(self) -> QKClipStats:
        """Clip every head whose recorded S_max exceeds tau; reset the running maxima for the next step."""
        self.record()
        missing = [name for (name, _), s in zip(self.layers, self._running, strict=True) if s is None]
        if missing:
            raise RuntimeError(f"QK-Clip: no max logits recorded for {missing}; call enable() and run a forward "
                               "pass before apply()")
        S = torch.stack(self._running)  # type: ignore[arg-type]  # [L, H]
        self._running = [None] * len(self.layers)
        if not torch.isfinite(S).all():
            bad = [name for (name, _), row in zip(self.layers, S, strict=True) if not torch.isfinite(row).all()]
            raise FloatingPointError(f"QK-Clip: non-finite max attention logits in {bad}")
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(S, op=dist.ReduceOp.MAX, group=self.group)  # S_max over the whole global batch
        gamma = torch.where(S > self.tau, self.tau / S, torch.ones_like(S))  # [L, H]
        for (name, attn), g in zip(self.layers, gamma, strict=True):
            if (g < 1).any():
                self._clip(name, attn, g)
        return QKClipStats([name for name, _ in self.layers], S, gamma)

    def _clip(self, name: str, attn: nn.Module, gamma: Tensor) -> None:
        root = gamma.sqrt()[:, None]  # [H, 1]
        ones = torch.ones_like(root)
        # one factor per output row of the whole matrix; a row-sharded (FSDP2) weight scales the rows it holds
        q_rows = torch.cat([root.expand(-1, self.d_nope), gamma[:, None].expand(-1, self.d_rope)], dim=1).flatten()
        kv_rows = torch.cat([root.expand(-1, self.d_nope), ones.expand(-1, self.d_v)], dim=1).flatten()
        for w, factor in ((self._q_weight(name, attn), q_rows), (self._kv_weight(name, attn), kv_rows)):
            local, start = local_rows(w)
            local.mul_(factor[start : start + local.shape[0], None].to(device=local.device, dtype=local.dtype))

    def _q_weight(self, name: str, attn: nn.Module) -> Tensor:
        for attr in ("q_b_proj", "q_proj"):
            if getattr(attn, attr, None) is not None:
                return self._checked(f"{name}.{attr}", getattr(attn, attr), self.d_nope + self.d_rope)
        raise ValueError(f"{name} has neither q_b_proj nor q_proj")

    def _kv_weight(self, name: str, attn: nn.Module) -> Tensor:
        proj = getattr(attn, "kv_b_proj", None)
        if proj is None:
            raise ValueError(f"{name} has no kv_b_proj")
        return self._checked(f"{name}.kv_b_proj", proj, self.d_nope + self.d_v)

    def _checked(self, name: str, proj: nn.Module, head_rows: int) -> Tensor:
        w = getattr(proj, "weight", None)
        if not isinstance(w, Tensor) or w.ndim != 2 or w.shape[0] != self.n_heads * head_rows:
            shape = None if not isinstance(w, Tensor) else tuple(w.shape)
            raise ValueError(f"{name}.weight has shape {shape}; QK-Clip expects {self.n_heads} heads x {head_rows} "
                             "rows")
        if not w.is_floating_point() or w.element_size() < 2:
            raise ValueError(f"{name}.weight is {w.dtype}; QK-Clip scales trainable float weights (not FP8)")
        if getattr(proj, "bias", None) is not None:
            raise ValueError(f"{name} has a bias; MLA's q/kv up-projections have none")
        return w
