"""Decode as one pure function of the weights, for ahead-of-time compilation (inference only; fp32, fp16 or int8).

`DecodeStep` runs one token of each of B sequences through the whole model with the functions the modules use
(`functional.py`, `rope.py`, `kimi_k2.ops.quantize.linear`): x = embed(token); per layer the absorbed MLA over each
sequence's cached latents (read from the engine's page pool through its page ids, keys past its length masked) plus
its own, then the dense MLP or the MoE (the B * k (token, expert) pairs sorted by expert, each expert one product over
its rows, read by id from the packed [E, ...] stacks); the final norm; lm_head. No shape depends on data: the batch,
the number of pages and the pool's size are the only dynamic sizes, so one compiled graph serves every batch and
context length.

Weights (`decode_weights`) are views of the model's own tensors after `prepare_decode_layout`: fp32 projections that
read the same input fused and transposed for the BLAS, quantized ones fused by rows, the routed experts packed.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from ..config import K2Config
from ..ops import kernels
from ..ops.kernels import QK, RG, pack_q8, unpack_q8
from ..ops.layout import fuse_columns, fused_view, pack_rows
from ..ops.quantize import QuantizedLinear, dequantize_blocks, linear, quantize_int8
from .functional import absorb, expert_mlp, latent_attention, rms_norm, route, routed_mixture, swiglu
from .grouped_experts import GroupedExperts, expert_stacks, groupable
from .layers import MLP, QuantizedEmbedding, embedding_rows
from .moe import MoE
from .rope import apply_rotary_emb


class Packed(NamedTuple):
    """A quantized projection as the kernels read it: weight [N, K] (int8 / fp16) and int8 scales [N, K/32] or None."""

    weight: torch.Tensor
    scales: torch.Tensor | None


class Absorbed(NamedTuple):
    """kv_b_proj of a quantized model as the absorbed attention reads it, per head: W_UK^T [H, C, nope] (so its
    product reads q_nope along nope) and W_UV [H, v, C], each Packed as the kernels read stacked experts."""

    uk: Packed
    uv: Packed


Projection = torch.Tensor | Packed  # fp32: W^T [K, N] (BLAS); int8 / fp16: Packed row-major
DecodeWeights = dict[str, Any]  # {"embed", "norm", "lm_head", "inv_freq", "layers": [per-layer dict]}


def _linear(x: torch.Tensor, w: Projection, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, K] -> [B, N] for a projection in either layout."""
    y = x @ w if isinstance(w, torch.Tensor) else linear(x, w.weight, w.scales)
    return y if bias is None else y + bias


def _embed(w: torch.Tensor | Packed, tokens: torch.Tensor) -> torch.Tensor:
    """The embedding rows of `tokens` in fp32 (a quantized table dequantizes only those rows)."""
    return embedding_rows(w, None, tokens) if isinstance(w, torch.Tensor) else embedding_rows(*w, tokens)


class DecodeStep:
    """step(weights, tokens, positions, pages, kv) for one model config and page size (Python constants).

    kv [L, num_pages * page_size, kv_lora_rank + qk_rope_head_dim] is the engine's latent page pool: row
    page * page_size + offset holds one token's [c_kv | k_pe]. tokens [B] int64; positions [B] int64: the number of
    tokens of each sequence already in kv, held by its pages [B, P] int64 in order (P * page_size > position; keys at
    positions >= position are masked, so pages past a sequence's end may be anything). Returns fp32 logits [B, vocab]
    and the tokens' latents [L, B, C + R], for the caller to store at their slots; kv is not written.
    """

    def __init__(self, config: K2Config, attention_factor: float, page_size: int) -> None:
        c = config
        kernels.load()  # now, not inside a torch.compile trace
        self.page_size = page_size
        self.eps, self.scale, self.attention_factor = c.rms_norm_eps, c.softmax_scale, attention_factor
        self.n_heads, self.nope, self.rope = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim
        self.kv_lora_rank, self.q_lora = c.kv_lora_rank, c.q_lora_rank is not None
        self.top_k, self.n_group, self.topk_group = c.num_experts_per_tok, c.n_group, c.topk_group
        self.sigmoid, self.group_by_top2 = c.scoring_func == "sigmoid", c.topk_method == "noaux_tc"
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor

    def __call__(self, w: DecodeWeights, tokens: torch.Tensor, positions: torch.Tensor, pages: torch.Tensor,
                 kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _embed(w["embed"], tokens)  # [B, D]
        freqs = positions.float()[:, None] * w["inv_freq"]  # [B, rope/2]
        cos = (freqs.cos() * self.attention_factor)[:, None]  # [B, 1, rope/2]: one query position per sequence
        sin = (freqs.sin() * self.attention_factor)[:, None]
        offsets = torch.arange(self.page_size, device=pages.device)
        slots = (pages[:, :, None] * self.page_size + offsets).flatten(1)  # [B, T = P * page_size]
        # keys: the T cached slots (those at positions >= position not written yet) and this token's own
        t = torch.arange(slots.shape[1] + 1, device=pages.device)
        hidden = (t >= positions[:, None]) & (t < slots.shape[1])  # [B, T + 1]
        mask = torch.zeros(hidden.shape, device=pages.device).masked_fill(hidden, float("-inf"))[:, None]
        latents = []
        for i, lw in enumerate(w["layers"]):
            out, latent = self._mla(lw, rms_norm(x, lw["input_norm"], self.eps), cos, sin, kv[i][slots], mask)
            x = x + out
            h = rms_norm(x, lw["post_norm"], self.eps)
            x = x + (self._moe(lw, h) if "router" in lw else self._mlp(lw["mlp"], h))
            latents.append(latent)
        return _linear(rms_norm(x, w["norm"], self.eps), w["lm_head"]), torch.stack(latents)

    def _mla(self, w: dict[str, Any], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cached: torch.Tensor,
             mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`MLA` latent path. x [B, D], cached [B, T, C + R], mask [B, 1, T + 1] -> out [B, D], latent [B, C + R]."""
        B, H, C = x.shape[0], self.n_heads, self.kv_lora_rank
        qkv = _linear(x, w["x_proj"], w.get("x_proj_bias"))
        q, kv = qkv.split_with_sizes([qkv.shape[1] - C - self.rope, C + self.rope], dim=-1)
        if self.q_lora:
            q = _linear(rms_norm(q, w["q_a_norm"], self.eps), w["q_b"])
        q_nope, q_pe = q.view(B, 1, H, -1).split_with_sizes([self.nope, self.rope], dim=-1)
        q_pe = apply_rotary_emb(q_pe, cos, sin)
        c_kv, k_pe = kv.view(B, 1, -1).split_with_sizes([C, self.rope], dim=-1)
        c_kv, k_pe = rms_norm(c_kv, w["kv_a_norm"], self.eps), apply_rotary_emb(k_pe, cos, sin)  # [B, 1, C], [B, 1, R]
        latent = torch.cat([c_kv, k_pe], dim=-1)  # [B, 1, C + R]
        keys = torch.cat([cached, latent], dim=1)  # [B, T + 1, C + R]
        if isinstance(w["kv_b"], Absorbed):
            out = self._absorbed_attention(w["kv_b"], q_nope[:, 0], q_pe[:, 0], keys[..., :C], keys[..., C:], mask)
        else:
            w_uk, w_uv_t = absorb(w["kv_b"], H, self.nope)
            out, _ = latent_attention(q_nope, q_pe, keys[..., :C], keys[..., C:], mask, w_uk, w_uv_t, self.scale)
        return _linear(out.reshape(B, -1), w["o"], w.get("o_bias")), latent[:, 0]

    def _absorbed_attention(self, w: Absorbed, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                            k_pe: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`latent_attention` with quantized W_UK^T / W_UV read by head through the kernels (one product per head):
        q_nope [B, H, nope], q_pe [B, H, R], c_kv [B, T, C], k_pe [B, T, R], mask [B, 1, T] -> out [B, H * v]."""
        B, H, _ = q_nope.shape
        heads = torch.arange(H, device=q_nope.device).repeat_interleave(B)  # [H * B]: rows ordered (head, sequence)
        q_lat = linear(q_nope.transpose(0, 1).reshape(H * B, -1), *w.uk, heads).view(H, B, -1).transpose(0, 1)
        scores = ((q_lat[:, :, None] * c_kv[:, None]).sum(-1)
                  + (q_pe[:, :, None] * k_pe[:, None]).sum(-1)) * self.scale + mask  # [B, H, T]
        o_lat = (scores.softmax(dim=-1)[..., None] * c_kv[:, None]).sum(-2)  # [B, H, C]
        out = linear(o_lat.transpose(0, 1).reshape(H * B, -1), *w.uv, heads)  # [H * B, v]
        return out.view(H, B, -1).transpose(0, 1).reshape(B, -1)

    @staticmethod
    def _mlp(w: tuple[Projection, Projection], x: torch.Tensor) -> torch.Tensor:
        """`MLP`: (gate | up, down), x [B, D] -> [B, D]."""
        gate_up, down = w
        return _linear(swiglu(*_linear(x, gate_up).chunk(2, dim=-1)), down)

    def _moe(self, w: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        """`MoE` for B tokens: x [B, D] -> [B, D]."""
        weights, ids, _ = route(_linear(x, w["router"]), w["router_bias"], self.top_k, self.n_group, self.topk_group,
                                self.group_by_top2, self.sigmoid, self.norm_topk_prob, self.routed_scaling_factor)
        gate_up, down = w["experts"]
        routed = routed_mixture(x, weights, ids, lambda rows, sids: expert_mlp(rows, sids, gate_up, down))
        return routed + self._mlp(w["shared"], x)


def check_decode_model(model: nn.Module) -> None:
    """Raise ValueError if `DecodeStep` cannot serve `model`: fp32 K2ForCausalLM models, their projections fp32 or
    quantized (`kimi_k2.ops.quantize`), plain MLP / MoE layers."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.weight.dtype != torch.float32:
            raise ValueError(f"compiled decode supports float32 or quantized (--quantization) weights; {name} is "
                             f"{m.weight.dtype}")
    embed = model.model.embed_tokens
    if not isinstance(embed, QuantizedEmbedding) and embed.weight.dtype != torch.float32:
        raise ValueError(f"compiled decode supports float32 models only, this one is "
                         f"{model.model.embed_tokens.weight.dtype}")
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        if not isinstance(mlp, (MoE, MLP)) or isinstance(mlp, MoE) and not (
                all(isinstance(e, MLP) for e in mlp.experts) and groupable(mlp.experts)):
            raise ValueError(f"compiled decode needs plain MLP / MoE layers; layer {i} is {type(mlp).__name__}")


def _projection(linears: list[nn.Module]) -> Projection:
    """The fused weight of linears reading one input: fp32 W^T [K, sum N] (`fuse_columns`), or quantized rows
    [sum N, K] (`pack_rows`). Views after `prepare_decode_layout`; else made here (a copy)."""
    if isinstance(linears[0], QuantizedLinear):
        scales = pack_rows([linears], "scales")[0] if linears[0].scales is not None else None
        return Packed(pack_rows([linears], "weight")[0], scales)
    weights = [m.weight.detach() for m in linears]
    fused = fused_view(weights)
    return fused if fused is not None else torch.cat([w.t() for w in weights], dim=1)


def _absorbed(m: nn.Module, n_heads: int, nope: int) -> torch.Tensor | Absorbed:
    """kv_b_proj [H * (nope + v), C] as the latent attention absorbs it, made once per `decode_weights`: an fp32
    model's own tensor; a quantized one's per-head W_UK^T and W_UV in its format (copies: 1/4 (int8, +1/32 scales) or
    1/2 (fp16) of the fp32 pair this replaces). fp16 is exact. int8: W_UV is kv_b_proj's own Q8_0 rows; W_UK^T is
    requantized from kv_b_proj's dequantized Q8_0 in blocks of 32 along nope, the axis its product reads (llama.cpp
    quantizes its k_b the same way, from the float weight). A shape the kernels cannot take stays fp32 (dequantized).
    """
    if not isinstance(m, QuantizedLinear):
        return m.weight.detach()
    C = m.in_features
    v = m.out_features // n_heads - nope
    if m.fmt == "fp16" and nope % 8 == 0:
        w = m.weight.view(n_heads, nope + v, C)
        return Absorbed(Packed(w[:, :nope].transpose(1, 2).contiguous(), None), Packed(w[:, nope:].contiguous(), None))
    if m.fmt == "fp16" or nope % QK or C % RG or v % RG:
        return m.dequantized()
    q, d = (t.view(n_heads, nope + v, -1) for t in unpack_q8(m.weight, m.scales))
    uk = pack_q8(*quantize_int8(dequantize_blocks(q[:, :nope], d[:, :nope]).transpose(1, 2)))
    return Absorbed(Packed(*uk), Packed(*pack_q8(q[:, nope:], d[:, nope:])))


def _embedding(m: nn.Module) -> torch.Tensor | Packed:
    """The embedding table [V, D]: fp32, or a QuantizedEmbedding's Packed buffers."""
    return Packed(m.weight, m.scales) if isinstance(m, QuantizedEmbedding) else m.weight.detach()


def _fuse(linears: list[nn.Module]) -> None:
    if isinstance(linears[0], QuantizedLinear):
        _projection(linears)
    else:
        fuse_columns(linears)


def prepare_decode_layout(model: nn.Module) -> None:
    """Lay the model's weights out as `DecodeStep` reads them, in place and without copies (`kimi_k2.ops.layout`):
    fused projections, packed routed experts (`GroupedExperts`). Values, names and state_dict are unchanged."""
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            _fuse([attn.q_proj if attn.q_lora_rank is None else attn.q_a_proj, attn.kv_a_proj_with_mqa])
            for m in [attn.o_proj] + ([] if attn.q_lora_rank is None else [attn.q_b_proj]):
                _fuse([m])
            for m in [mlp.shared_experts] if isinstance(mlp, MoE) else [mlp]:
                _fuse([m.gate_proj, m.up_proj])
                _fuse([m.down_proj])
            if isinstance(mlp, MoE):
                fuse_columns([mlp.gate])
                if not isinstance(mlp.experts, GroupedExperts):
                    mlp.experts = GroupedExperts(mlp.experts)
        _fuse([model.lm_head])


def decode_weights(model: nn.Module) -> DecodeWeights:
    """The tensors `DecodeStep` reads: views of the model's own after `prepare_decode_layout`, else copies."""
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        first = attn.q_proj if attn.q_lora_rank is None else attn.q_a_proj
        w: dict[str, Any] = {
            "input_norm": layer.input_layernorm.weight, "post_norm": layer.post_attention_layernorm.weight,
            "x_proj": _projection([first, attn.kv_a_proj_with_mqa]), "kv_a_norm": attn.kv_a_layernorm.weight,
            "kv_b": _absorbed(attn.kv_b_proj, attn.n_heads, attn.qk_nope_head_dim), "o": _projection([attn.o_proj])}
        if attn.q_lora_rank is not None:
            w.update(q_a_norm=attn.q_a_layernorm.weight, q_b=_projection([attn.q_b_proj]))
        if first.bias is not None or attn.kv_a_proj_with_mqa.bias is not None:
            w["x_proj_bias"] = torch.cat([m.bias.detach().float() if m.bias is not None else
                                          torch.zeros(m.out_features) for m in (first, attn.kv_a_proj_with_mqa)])
        if attn.o_proj.bias is not None:
            w["o_bias"] = attn.o_proj.bias
        if isinstance(mlp, MoE):
            stacks = mlp.experts.stacks() if isinstance(mlp.experts, GroupedExperts) else expert_stacks(mlp.experts)
            w.update(router=_projection([mlp.gate]), router_bias=mlp.gate.e_score_correction_bias,
                     shared=_mlp_weights(mlp.shared_experts), experts=stacks)
        else:
            w["mlp"] = _mlp_weights(mlp)
        layers.append(w)
    m = model.model
    return {"embed": _embedding(m.embed_tokens), "norm": m.norm.weight, "lm_head": _projection([model.lm_head]),
            "inv_freq": m.rotary.inv_freq, "layers": layers}


def _mlp_weights(mlp: MLP) -> tuple[Projection, Projection]:
    return _projection([mlp.gate_proj, mlp.up_proj]), _projection([mlp.down_proj])
