"""LLMEngine: requests in, CompletionDeltas out, one `step()` (schedule -> forward -> sample) at a time."""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kimi_k2.engine.block_manager import BlockManager
from kimi_k2.engine.detokenize import TextStream
from kimi_k2.engine.engine_config import EngineConfig
from kimi_k2.engine.model_runner import ModelRunner
from kimi_k2.engine.paged_cache import LatentPool, default_attention
from kimi_k2.engine.params import CompletionDelta, SamplingParams, TokenLogprob
from kimi_k2.engine.sampler import sample
from kimi_k2.engine.scheduler import Scheduler
from kimi_k2.engine.sequence import Sequence

MAX_LOGPROBS = 20


class PromptTooLongError(ValueError):
    pass


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    streams: list[TextStream | None]


def validate_params(p: SamplingParams, vocab_size: int, has_tokenizer: bool) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"invalid SamplingParams: {msg}")

    need(isinstance(p.max_tokens, int) and p.max_tokens >= 1, f"max_tokens must be an int >= 1, got {p.max_tokens!r}")
    need(math.isfinite(p.temperature) and p.temperature >= 0, f"temperature must be >= 0, got {p.temperature!r}")
    need(0 < p.top_p <= 1, f"top_p must be in (0, 1], got {p.top_p!r}")
    need(isinstance(p.top_k, int) and p.top_k >= 0, f"top_k must be an int >= 0 (0 = off), got {p.top_k!r}")
    need(0 <= p.min_p <= 1, f"min_p must be in [0, 1], got {p.min_p!r}")
    need(-2 <= p.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {p.presence_penalty!r}")
    need(-2 <= p.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {p.frequency_penalty!r}")
    need(isinstance(p.n, int) and p.n >= 1, f"n must be an int >= 1, got {p.n!r}")
    need(p.seed is None or isinstance(p.seed, int), f"seed must be an int or None, got {p.seed!r}")
    need(p.logprobs is None or (isinstance(p.logprobs, int) and 0 <= p.logprobs <= MAX_LOGPROBS),
         f"logprobs must be None or an int in [0, {MAX_LOGPROBS}], got {p.logprobs!r}")
    need(all(isinstance(s, str) and s for s in p.stop), f"stop must be a list of non-empty strings, got {p.stop!r}")
    need(not p.stop or has_tokenizer, "stop strings need an engine with a tokenizer")
    need(all(isinstance(t, int) and 0 <= t < vocab_size for t in p.stop_token_ids),
         f"stop_token_ids must be token ids in [0, {vocab_size}), got {p.stop_token_ids!r}")
    need(all(isinstance(t, int) and 0 <= t < vocab_size and not math.isnan(b) for t, b in p.logit_bias.items()),
         f"logit_bias must map token ids in [0, {vocab_size}) to numbers")


class LLMEngine:
    def __init__(self, model: nn.Module, tokenizer: Any = None, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.model = model.eval()
        self.model_config = model.config
        self.tokenizer = tokenizer
        weight = next(model.parameters())
        dtype, self.device = self.config.dtype or weight.dtype, weight.device  # the engine runs where the model is
        self.max_model_len, num_pages = self.config.resolve(self.model_config, dtype)
        graphs = self.config.cuda_graphs
        if graphs is None:
            graphs = self.device.type == "cuda" and (self.config.attention_backend or default_attention(self.device)
                                                     ) == "triton"
        # with graphs, one more page: the scratch page padding rows write to, never given to a sequence
        self.pool = LatentPool(self.model_config, num_pages + graphs, self.config.page_size, dtype, self.device,
                               self.config.attention_backend or ("triton" if graphs else None))
        self.block_manager = BlockManager(num_pages, self.config.page_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self.runner = ModelRunner(model, self.pool, self.config.compile_decode, self.config.decode_backend)
        if graphs:
            self.runner.use_decode_graphs(self.config.max_num_seqs, self.max_model_len, scratch_page=num_pages)
        self.eos_token_ids = set(self.model_config.eos_token_ids) | set(getattr(tokenizer, "stop_token_ids", []))
        self.requests: dict[str, Request] = {}
        self.pending: list[CompletionDelta] = []  # abort notices, sent by the next step()
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self.num_steps = 0
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike[str], config: EngineConfig | None = None,
                        dtype: torch.dtype = torch.bfloat16, quantization: str | None = None,
                        device: torch.device | str = "cpu") -> LLMEngine:
        """Model weights (and the tokenizer, when `tiktoken.model` is there) from a Kimi-format directory, on `device`
        (the engine's cache, inputs and sampling follow the model).

        quantization "int8" / "fp16": projections in that format, read tensor by tensor (`dtype` is then fp32; CPU).
        """
        from kimi_k2.engine.loader import load_model

        model = load_model(str(model_dir), dtype, quantization=quantization, device=device)
        tokenizer = None
        if (Path(model_dir) / "tiktoken.model").is_file():
            from kimi_k2.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_pretrained(model_dir)
        return cls(model, tokenizer, config)

    # ---- requests ------------------------------------------------------------------------------------------
    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (PromptTooLongError for length) if the request cannot be served; does no work."""
        vocab = self.model_config.vocab_size
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if len(prompt_ids) == 0:
            raise ValueError("prompt_ids is empty: a request needs at least one prompt token")
        bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_ids holds {len(bad)} ids outside [0, {vocab}), first {bad[0]!r}")
        if len(prompt_ids) > self.max_model_len - 1:
            raise PromptTooLongError(f"prompt has {len(prompt_ids)} tokens but max_model_len is {self.max_model_len}"
                                     f": at most {self.max_model_len - 1} prompt tokens leave room for one more")
        validate_params(params, vocab, self.tokenizer is not None)

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        prompt_ids = list(prompt_ids)
        self.check_request(prompt_ids, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seqs = [Sequence(request_id, 0, prompt_ids, params, device=self.device)]
        seqs += [Sequence(request_id, i, prompt_ids, params, first=seqs[0], device=self.device)
                 for i in range(1, params.n)]
        streams = [TextStream(self.tokenizer, params.stop) if self.tokenizer is not None else None for _ in seqs]
        self.requests[request_id] = Request(request_id, prompt_ids, params, seqs, streams)
        for seq in seqs:
            self.scheduler.add(seq)
        self.num_prompt_tokens += len(prompt_ids) * params.n
        return request_id

    def abort(self, request_id: str) -> bool:
        """Finish every sample of `request_id` now and free its pages; False if it is unknown or already done."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
                self.pending.append(self._delta(req, seq, [], "", None, "abort"))
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self.pending)

    # ---- one step ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[CompletionDelta]:
        out, self.pending = self.pending, []
        batch = self.scheduler.schedule()
        if not batch:
            return out
        self.num_steps += 1
        seqs, logits = self.runner.run(batch)
        for seq, n in batch:
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)
        if seqs:
            token_ids, logprobs, errors = sample(logits, seqs)
            for seq, t, lp, err in zip(seqs, token_ids, logprobs, errors, strict=True):
                if seq.request_id not in self.requests:
                    continue  # a sibling sample's failure ended this request in this very step
                out += self._fail(seq.request_id, err) if err is not None else self._append(seq, t, lp)
        return out

    def _fail(self, request_id: str, error: str) -> list[CompletionDelta]:
        """End every unfinished sample of a request with `error` (finish_reason "abort"); frees its pages."""
        req = self.requests.pop(request_id)
        out = []
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
                d = self._delta(req, seq, [], "", None, "abort")
                d.error = error
                out.append(d)
        return out

    def _append(self, seq: Sequence, token_id: int, logprob: TokenLogprob | None) -> list[CompletionDelta]:
        req = self.requests[seq.request_id]
        stream = req.streams[seq.index]
        p = seq.params
        seq.token_ids.append(token_id)
        self.num_generated_tokens += 1
        reason = None
        if seq.constraint is not None:
            try:
                seq.constraint.advance(token_id)
                done = seq.constraint.is_finished()
            except Exception as e:  # only this request fails, the batch goes on
                return self._fail(req.request_id, f"the output constraint failed: {e}")
            if done:
                reason = "stop"
        if token_id in p.stop_token_ids or (not p.ignore_eos and token_id in self.eos_token_ids):
            reason, text = "stop", ""
        else:
            text = stream.push(token_id) if stream is not None else ""
            if stream is not None and stream.stopped:
                reason = "stop"
        if reason is None and (seq.num_completion_tokens >= p.max_tokens or len(seq) >= self.max_model_len):
            reason = "length"
        if reason is not None:
            text += stream.finish() if stream is not None else ""
            self.scheduler.finish(seq, reason)
            if all(s.is_finished for s in req.seqs):
                del self.requests[req.request_id]
        return [self._delta(req, seq, [token_id], text, None if logprob is None else [logprob], reason)]

    @staticmethod
    def _delta(req: Request, seq: Sequence, token_ids: list[int], text: str, logprobs: list[TokenLogprob] | None,
               reason: str | None) -> CompletionDelta:
        return CompletionDelta(req.request_id, seq.index, token_ids, text, logprobs, reason is not None, reason,
                               len(req.prompt_ids), seq.num_completion_tokens, seq.num_cached_prompt_tokens)

    # ---- offline -------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[list[CompletionDelta]]:
        """Run `prompts` to completion -> per prompt, per sample, one CompletionDelta holding the whole output."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        for prompt, p in zip(prompts, plist, strict=True):
            self.check_request(list(prompt), p)
        ids = [self.add_request(prompt, p) for prompt, p in zip(prompts, plist, strict=True)]
        results: dict[tuple[str, int], CompletionDelta] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=sum(p.n for p in plist), desc="generate", unit="sample")
        while self.has_unfinished():
            for d in self.step():
                acc = results.get((d.request_id, d.index))
                if acc is None:
                    results[(d.request_id, d.index)] = d
                    acc = d
                else:
                    acc.token_ids = acc.token_ids + d.token_ids
                    acc.text += d.text
                    acc.logprobs = acc.logprobs + d.logprobs if acc.logprobs is not None else d.logprobs
                    acc.finished, acc.finish_reason, acc.error = d.finished, d.finish_reason, d.error
                    acc.completion_tokens, acc.cached_prompt_tokens = d.completion_tokens, d.cached_prompt_tokens
                if bar is not None and d.finished:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return [[results[(rid, i)] for i in range(p.n)] for rid, p in zip(ids, plist, strict=True)]

    @torch.inference_mode()
    def prompt_logprobs(self, prompt_ids: list[int], k: int, chunk: int = 256) -> list[TokenLogprob | None]:
        """Each prompt token's logprob given the tokens before it, with the top k (None for the first token): the
        prompt half of a completion's `echo` with `logprobs`. One forward over the prompt, outside the page pool."""
        if self.runner.forward_fn != self.runner.forward:
            raise ValueError("prompt logprobs (echo with logprobs) are not available when the model is split over "
                             "ranks (--ep)")
        hidden = self.runner.model.model(torch.tensor([prompt_ids]))[0]  # [S, D]
        out: list[TokenLogprob | None] = [None]
        for start in range(0, len(prompt_ids) - 1, chunk):
            lp = self.runner.model.lm_head(hidden[start:start + chunk]).float().log_softmax(-1)  # predicts start+1..
            nxt = torch.tensor(prompt_ids[start + 1:start + 1 + len(lp)])
            chosen = lp[torch.arange(len(nxt)), nxt].tolist()
            top_v, top_i = lp[: len(nxt)].topk(k) if k else (lp[: len(nxt), :0], lp[: len(nxt), :0].long())
            for j, (t, v) in enumerate(zip(nxt.tolist(), chosen, strict=True)):
                out.append(TokenLogprob(t, v, list(zip(top_i[j].tolist(), top_v[j].tolist(), strict=True))))
        return out

    def stats(self) -> dict[str, Any]:
        bm = self.block_manager
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "pages_used": bm.num_used_pages,
            "pages_total": bm.num_pages,
            "page_size": bm.page_size,
            "prefix_cache_hit_rate": bm.hit_rate,
            "prompt_tokens": self.num_prompt_tokens,
            "generation_tokens": self.num_generated_tokens,
            "preemptions": self.scheduler.num_preemptions,
            "steps": self.num_steps,
            "cache_bytes_per_token": self.pool.bytes_per_token,
            "max_model_len": self.max_model_len,
        }
