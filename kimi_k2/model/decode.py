"""Single-stream decode as one pure function of the weights, for `torch.compile` (inference only, fp32).

`DecodeStep` runs one token of one sequence through the whole model with the functions the modules use
(`functional.py`, `rope.py`): x = embed(token); per layer the absorbed MLA over the sequence's cached latents (read
from the engine's page pool through its page ids, keys past its length masked) plus this token's own, then the dense
MLP or the MoE; the final norm; lm_head. No shape depends on data (the k routed experts are read by index from the
stacked [E, ...] expert weights, see `kimi_k2.ops.layout`), and every size is fixed except the number of pages and
the pool's size, so torch.compile makes one graph for all context lengths.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import K2Config
from ..ops.layout import fuse_columns, fused_view, stack_parameters, stacked_view
from ..ops.quantize import QuantizedLinear
from .functional import absorb, latent_attention, rms_norm, route, swiglu
from .layers import MLP
from .moe import MoE
from .rope import apply_rotary_emb

DecodeWeights = dict[str, Any]  # {"embed", "norm", "lm_head", "inv_freq", "layers": [per-layer dict of tensors]}


def _mv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w [..., out, in] @ x [..., in] -> [..., out] as a reduction inductor fuses with the gather of w's rows."""
    return (w * x.unsqueeze(-2)).sum(-1)


def _linear(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ W^T [in, out] (+ bias): the weights come transposed (`fuse_columns`), as the BLAS streams them."""
    y = x @ wt
    return y if bias is None else y + bias


class DecodeStep:
    """step(weights, token, position, pages, kv) for one model config and page size (Python constants).

    kv [L, num_pages * page_size, kv_lora_rank + qk_rope_head_dim] is the engine's latent page pool: row
    page * page_size + offset holds one token's [c_kv | k_pe]. token [1] int64; position: 0-d int64, the number of
    tokens of the sequence already in kv, held by the pages [P] int64 in order (P * page_size > position; keys at
    positions >= position are masked). Returns fp32 logits [1, vocab] and this token's latents [L, C + R], for the
    caller to store at the token's slot; kv is not written.
    """

    def __init__(self, config: K2Config, attention_factor: float, page_size: int) -> None:
        c = config
        self.page_size = page_size
        self.eps, self.scale, self.attention_factor = c.rms_norm_eps, c.softmax_scale, attention_factor
        self.n_heads, self.nope, self.rope = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim
        self.kv_lora_rank, self.q_lora = c.kv_lora_rank, c.q_lora_rank is not None
        self.top_k, self.n_group, self.topk_group = c.num_experts_per_tok, c.n_group, c.topk_group
        self.sigmoid, self.group_by_top2 = c.scoring_func == "sigmoid", c.topk_method == "noaux_tc"
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor

    def __call__(self, w: DecodeWeights, token: torch.Tensor, position: torch.Tensor, pages: torch.Tensor,
                 kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = w["embed"][token][None]  # [1, 1, D]: batch and sequence of one
        freqs = position.float() * w["inv_freq"]  # [rope/2]
        cos, sin = freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor
        cos, sin = cos.view(1, 1, -1), sin.view(1, 1, -1)
        offsets = torch.arange(self.page_size, device=pages.device)
        slots = (pages[:, None] * self.page_size + offsets).flatten()  # [T = P * page_size]
        # keys: the T cached slots (those at positions >= position not written yet) and this token's own
        t = torch.arange(slots.shape[0] + 1, device=pages.device)
        mask = torch.zeros(t.shape).masked_fill((t >= position) & (t < slots.shape[0]), float("-inf")).view(1, 1, -1)
        latents = []
        for i, lw in enumerate(w["layers"]):
            out, latent = self._mla(lw, rms_norm(x, lw["input_norm"], self.eps), cos, sin, kv[i][slots], mask)
            x = x + out
            h = rms_norm(x, lw["post_norm"], self.eps)
            x = x + (self._moe(lw, h[0]) if "router" in lw else self._mlp(lw["mlp"], h))
            latents.append(latent)
        return _linear(rms_norm(x, w["norm"], self.eps)[0], w["lm_head"]), torch.cat(latents)

    def _mla(self, w: dict[str, Any], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cached: torch.Tensor,
             mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`MLA` latent path. x [1, 1, D], cached [T, C + R], mask [1, 1, T + 1] -> out [1, 1, D], latent [1, C + R]."""
        H, C = self.n_heads, self.kv_lora_rank
        q, kv = _linear(x, w["x_proj"], w.get("x_proj_bias")).split_with_sizes([w["x_proj"].shape[1] - C - self.rope,
                                                                                C + self.rope], dim=-1)
        if self.q_lora:
            q = _linear(rms_norm(q, w["q_a_norm"], self.eps), w["q_b"])
        q_nope, q_pe = q.view(1, 1, H, -1).split_with_sizes([self.nope, self.rope], dim=-1)
        q_pe = apply_rotary_emb(q_pe, cos, sin)
        c_kv, k_pe = kv.split_with_sizes([C, self.rope], dim=-1)
        c_kv, k_pe = rms_norm(c_kv, w["kv_a_norm"], self.eps), apply_rotary_emb(k_pe, cos, sin)  # [1, 1, C], [1, 1, R]
        latent = torch.cat([c_kv, k_pe], dim=-1)[0]  # [1, C + R]
        keys = torch.cat([cached, latent])[None]  # [1, T + 1, C + R]
        w_uk, w_uv_t = absorb(w["kv_b"], H, self.nope)
        out, _ = latent_attention(q_nope, q_pe, keys[..., :C], keys[..., C:], mask, w_uk, w_uv_t, self.scale)
        return _linear(out.flatten(2), w["o"], w.get("o_bias")), latent

    @staticmethod
    def _mlp(w: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """`MLP`: ([gate | up]^T, down^T), x [..., D] -> [..., D]."""
        gate_up, down = w
        return _linear(swiglu(*_linear(x, gate_up).chunk(2, dim=-1)), down)

    def _moe(self, w: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        """`MoE` for one token: x [1, D] -> [1, 1, D]."""
        weights, ids, _ = route(_linear(x, w["router"]), w["router_bias"], self.top_k, self.n_group, self.topk_group,
                                self.group_by_top2, self.sigmoid, self.norm_topk_prob, self.routed_scaling_factor)
        ids = ids[0]  # [k]
        gate, up, down = (s[ids] for s in w["experts"])  # [k, I, D], [k, I, D], [k, D, I]: reductions over rows
        routed = _mv(down, swiglu(_mv(gate, x), _mv(up, x)))  # [k, D]
        return (weights @ routed + self._mlp(w["shared"], x))[None]


def check_decode_model(model: nn.Module) -> None:
    """Raise ValueError if `DecodeStep` cannot serve `model` (it supports plain fp32 K2ForCausalLM models)."""
    dtype = model.lm_head.weight.dtype if isinstance(model.lm_head, nn.Linear) else None
    if dtype != torch.float32:
        raise ValueError(f"compiled decode supports float32 models only, this one is "
                         f"{dtype or getattr(model.lm_head, 'fmt', type(model.lm_head).__name__)}")
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            raise ValueError(f"compiled decode supports float32 weights only; {name} is {m.fmt}")
    for i, layer in enumerate(model.model.layers):
        if not isinstance(layer.mlp, (MoE, MLP)) or isinstance(layer.mlp, MoE) and not all(
                isinstance(e, MLP) for e in layer.mlp.experts):
            raise ValueError(f"compiled decode needs plain MLP / MoE layers; layer {i} is {type(layer.mlp).__name__}")


def _expert_stacks(moe: MoE) -> tuple[torch.Tensor, ...]:
    """[E, I, D] gate, [E, I, D] up, [E, D, I] down: views when the experts are stacked (`ops.layout`), else copies."""
    out = []
    for proj in ("gate_proj", "up_proj", "down_proj"):
        ws = [getattr(e, proj).weight.detach() for e in moe.experts]
        view = stacked_view(ws)
        out.append(view if view is not None else torch.stack(ws))
    return tuple(out)


def transposed(linears: list[nn.Module]) -> torch.Tensor:
    """[in, sum(out)] W^T of the linears side by side: the tensor `fuse_columns` made (a view), else a copy."""
    weights = [m.weight.detach() for m in linears]
    fused = fused_view(weights)
    return fused if fused is not None else torch.cat([w.t() for w in weights], dim=1)


def prepare_decode_layout(model: nn.Module) -> None:
    """Lay the model's weights out as `DecodeStep` reads them, in place and without copies (`kimi_k2.ops.layout`):
    fused transposed projections, stacked routed experts. Values, names and state_dict are unchanged."""
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            fuse_columns([attn.q_proj if attn.q_lora_rank is None else attn.q_a_proj, attn.kv_a_proj_with_mqa])
            for m in [attn.o_proj] + ([] if attn.q_lora_rank is None else [attn.q_b_proj]):
                fuse_columns([m])
            for m in [mlp.shared_experts] if isinstance(mlp, MoE) else [mlp]:
                fuse_columns([m.gate_proj, m.up_proj])
                fuse_columns([m.down_proj])
            if isinstance(mlp, MoE):
                fuse_columns([mlp.gate])
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    stack_parameters([getattr(e, proj) for e in mlp.experts], "weight")
        fuse_columns([model.lm_head])


def decode_weights(model: nn.Module) -> DecodeWeights:
    """The tensors `DecodeStep` reads: views of the model's own after `prepare_decode_layout`, else copies."""
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        first = attn.q_proj if attn.q_lora_rank is None else attn.q_a_proj
        w: dict[str, Any] = {
            "input_norm": layer.input_layernorm.weight, "post_norm": layer.post_attention_layernorm.weight,
            "x_proj": transposed([first, attn.kv_a_proj_with_mqa]), "kv_a_norm": attn.kv_a_layernorm.weight,
            "kv_b": attn.kv_b_proj.weight, "o": transposed([attn.o_proj])}
        if attn.q_lora_rank is not None:
            w.update(q_a_norm=attn.q_a_layernorm.weight, q_b=transposed([attn.q_b_proj]))
        if first.bias is not None or attn.kv_a_proj_with_mqa.bias is not None:
            w["x_proj_bias"] = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                                          for m in (first, attn.kv_a_proj_with_mqa)])
        if attn.o_proj.bias is not None:
            w["o_bias"] = attn.o_proj.bias
        if isinstance(mlp, MoE):
            w.update(router=transposed([mlp.gate]), router_bias=mlp.gate.e_score_correction_bias,
                     shared=_mlp_weights(mlp.shared_experts), experts=_expert_stacks(mlp))
        else:
            w["mlp"] = _mlp_weights(mlp)
        layers.append(w)
    m = model.model
    return {"embed": m.embed_tokens.weight, "norm": m.norm.weight, "lm_head": transposed([model.lm_head]),
            "inv_freq": m.rotary.inv_freq, "layers": layers}


def _mlp_weights(mlp: MLP) -> tuple[torch.Tensor, torch.Tensor]:
    return transposed([mlp.gate_proj, mlp.up_proj]), transposed([mlp.down_proj])
