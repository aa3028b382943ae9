"""Next-token choice for a batch of sequences, each with its own SamplingParams.

Order (as vLLM): constraint mask -> logit_bias (added; -inf bans a token) -> presence/frequency penalties
(OpenAI: l -= f * count + p * [count > 0]) -> logprobs (of this distribution, before temperature) -> greedy argmax
(temperature 0) or temperature -> top_k -> top_p (on the top_k-renormalized probabilities) -> min_p (p < min_p *
p_max dropped) -> one draw. A draw is argmax(p / E) with E ~ Exp(1) from the sequence's own generator: an exact
categorical sample, reproducible per seed whatever else shares the batch.

Everything runs on the logits' device (the engine's): parameters and penalty counts go there, the generators live
there, a constraint's mask is copied there; the one transfer back per step is the chosen token ids (and logprobs
when asked for).

A constraint that fails (allows no token, or raises) fails only its own sequence: `sample` reports it, and the
engine ends that request with the error while the rest of the batch goes on.
"""

from __future__ import annotations

import torch

from kimi_k2.engine.params import TokenLogprob
from kimi_k2.engine.sequence import Sequence


def apply_constraints_and_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> list[str | None]:
    """logits [N, V] (fp32, modified in place) -> per sequence, None or why its constraint failed (its row is then
    left finite, and its token must be discarded)."""
    vocab = logits.shape[-1]
    errors: list[str | None] = [None] * len(seqs)
    for i, seq in enumerate(seqs):
        p = seq.params
        if seq.constraint is not None:
            try:
                allowed = seq.constraint.allowed()
            except Exception as e:  # a broken constraint (e.g. the grammar engine's own error) fails this sequence
                errors[i] = f"the output constraint failed: {e}"
                continue
            if allowed is not None:
                if not bool(allowed[:vocab].any()):
                    errors[i] = "the output constraint allows no token"
                    continue
                logits[i].masked_fill_(~allowed[:vocab].to(logits.device, non_blocking=True), float("-inf"))
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            logits[i, ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
            if not bool(torch.isfinite(logits[i]).any()):
                errors[i] = "logit_bias and the output constraint leave no token"
                logits[i].nan_to_num_(0.0, neginf=0.0)
                continue
        if (p.presence_penalty or p.frequency_penalty) and seq.num_completion_tokens:
            ids = torch.tensor(seq.completion_ids, device=logits.device)
            counts = logits.new_zeros(vocab).index_add_(0, ids, torch.ones_like(ids, dtype=logits.dtype))
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits)
    return errors


def filter_logits(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                  truncate: bool | None = None, use_min_p: bool | None = None) -> torch.Tensor:
    """x [M, V] temperature-scaled logits; top_k [M] (0 = off), top_p [M], min_p [M]. Dropped tokens get -inf.

    truncate / use_min_p: whether any row has top_k or top_p / min_p on, when the caller knows it on the host (else
    read from the tensors: a device sync on CUDA)."""
    vocab = x.shape[-1]
    if truncate is None:
        truncate = bool((top_k > 0).any()) or bool((top_p < 1).any())
    if use_min_p is None:
        use_min_p = bool((min_p > 0).any())
    if truncate:
        xs, order = x.sort(dim=-1, descending=True)
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
        xs = xs.masked_fill(torch.arange(vocab, device=x.device)[None] >= k[:, None], float("-inf"))
        probs = xs.softmax(-1)
        xs = xs.masked_fill(probs.cumsum(-1) - probs >= top_p[:, None], float("-inf"))  # keeps the first token
        x = torch.empty_like(x).scatter_(-1, order, xs)
    if use_min_p:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), float("-inf"))
    return x


def sample(logits: torch.Tensor, seqs: list[Sequence]
           ) -> tuple[list[int], list[TokenLogprob | None], list[str | None]]:
    """logits [N, V] for seqs[i]'s next token -> (token ids, logprobs or None, constraint error or None), per
    sequence."""
    logits = logits.float()
    errors = apply_constraints_and_penalties(logits, seqs)
    tokens = logits.argmax(-1)
    rand = [i for i, s in enumerate(seqs) if s.params.temperature > 0]
    if rand:
        dev = logits.device
        ps = [seqs[i].params for i in rand]
        idx = torch.tensor(rand, device=dev)
        temp = torch.tensor([p.temperature for p in ps], device=dev)
        top_k = torch.tensor([p.top_k for p in ps], device=dev)
        top_p = torch.tensor([p.top_p for p in ps], device=dev)
        min_p = torch.tensor([p.min_p for p in ps], device=dev)
        truncate = any(p.top_k > 0 or p.top_p < 1 for p in ps)
        probs = filter_logits(logits[idx] / temp[:, None], top_k, top_p, min_p, truncate,
                              any(p.min_p > 0 for p in ps)).softmax(-1)
        for j, i in enumerate(rand):
            e = torch.empty_like(probs[j]).exponential_(generator=seqs[i].generator)
            tokens[i] = (probs[j] / e).argmax()
    token_ids = tokens.tolist()
    want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    logprobs: list[TokenLogprob | None] = [None] * len(seqs)
    if want:
        lp = logits[torch.tensor(want, device=logits.device)].log_softmax(-1)
        for j, i in enumerate(want):
            k = seqs[i].params.logprobs
            top_v, top_i = lp[j].topk(k) if k else (lp[j][:0], lp[j][:0].long())
            top = list(zip(top_i.tolist(), top_v.tolist(), strict=True))
            logprobs[i] = TokenLogprob(token_ids[i], float(lp[j, token_ids[i]]), top)
    return token_ids, logprobs, errors
