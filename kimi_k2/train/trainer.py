"""The training loop: pretraining or SFT of K2ForCausalLM from a Recipe, single process or data parallel.

One optimizer step t:
  for each micro-batch m: loss_m = sum of token CE / (targets in the global batch) + MoE seq-aux loss / grad_accum
  clip the gradient norm, optimizer.step(), QK-Clip from the step's per-head max logits (muonclip)
  aux-loss-free balancing (DeepSeek-V3 §2.1.2): b_e += gamma * sign(mean(load) - load_e), load summed over the
  step's micro-batches and ranks
Logs go to OUT/log.jsonl (and TensorBoard when asked); checkpoints to OUT/checkpoints; the final model to OUT/final.
Under torchrun the ranks train data parallel (`kimi_k2.parallel`), optionally with the routed experts split over them
(`train.expert_parallel`). Checkpoints are written by rank 0 (by every rank under expert parallelism) into
train.out_dir, so across machines out_dir must be on a filesystem every node sees for a run to resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kimi_k2.checkpoint import save_state_dict
from kimi_k2.checkpoint.writer import is_weight_file, remove_interrupted_writes
from kimi_k2.model import K2ForCausalLM
from kimi_k2.parallel import (
    DistInfo,
    all_reduce_,
    barrier,
    gather_full_state_dict,
    init_distributed,
    shard_experts,
    shutdown,
    wrap_data_parallel,
)
from kimi_k2.train import checkpointing
from kimi_k2.train.data import IGNORE_INDEX, BatchOrder, PackedRows, expand_paths, load_pretrain, load_sft
from kimi_k2.train.optim import build_optimizer
from kimi_k2.train.param_groups import freeze
from kimi_k2.train.recipe import Recipe
from kimi_k2.train.schedules import Schedule, set_lr


@dataclass
class StepStats:
    loss: float
    aux_loss: float
    grad_norm: float
    tokens: int
    max_logit: list[float]  # per layer, max over heads (empty when not tracked)
    expert_load: torch.Tensor  # [moe layers, E] token counts
    qk_clip: dict[str, Any]


def load_tokenizer(path: str | None) -> Any:
    if path is None:
        return None
    from kimi_k2.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(path)


def load_data(recipe: Recipe, tokenizer: Any, vocab_size: int) -> tuple[PackedRows, PackedRows | None]:
    paths = expand_paths(recipe.data.paths)
    if recipe.data.kind == "sft":
        rows, truncated = load_sft(paths, recipe.data.seq_len, tokenizer, recipe.data.workers, recipe.data.tokenizer)
        if truncated:
            print(f"warning: {truncated} conversations longer than seq_len + 1 were truncated")
    else:
        rows = load_pretrain(paths, recipe.data.seq_len, tokenizer)
    top = int(rows.tokens.max())
    if top >= vocab_size:
        raise ValueError(f"data has token id {top} but the model's vocab_size is {vocab_size}")
    if recipe.data.val_fraction == 0:
        return rows, None
    return rows.split(recipe.data.val_fraction, recipe.train.seed)


class Trainer:
    def __init__(self, recipe: Recipe, dist_info: DistInfo | None = None) -> None:
        self.recipe, self.dist = recipe, dist_info or DistInfo()
        t = recipe.train
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(t.seed)
        self.device = self.dist.device
        self.out = Path(t.out_dir)
        self.config = recipe.model.build_config()
        self.tokenizer = load_tokenizer(recipe.data.tokenizer)
        self.train_rows, self.val_rows = load_data(recipe, self.tokenizer, self.config.vocab_size)
        if recipe.model.init_from:
            self.model = K2ForCausalLM.from_pretrained(recipe.model.init_from, dtype=torch.float32)
        else:
            self.model = K2ForCausalLM.from_config(self.config, dtype=torch.float32)
        self.model.to(self.device).train()
        freeze(self.model, t.freeze)
        self.local_experts: list[str] = []  # expert-parallel: this rank's expert parameter names
        if t.expert_parallel and self.dist.enabled:
            self.local_experts = shard_experts(self.model, self.dist.rank, self.dist.world_size)
        self.ep = bool(self.local_experts)
        self.ddp_model = wrap_data_parallel(self.model, self.dist, ignore=self.local_experts)
        self.optimizer, self.qk_clip = build_optimizer(self.model, recipe.optim)
        self.schedule = Schedule(**vars(recipe.schedule))
        self.order = BatchOrder(len(self.train_rows), t.micro_batch, t.grad_accum, self.dist.world_size, t.seed)
        layers = self.model.model.layers
        self.attn = [layer.self_attn for layer in layers]
        self.moe = [layer.mlp for i, layer in enumerate(layers) if self.config.is_moe_layer(i)]
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.dtype == "bfloat16")
        self.step, self.tokens_seen = 0, 0
        self.tb: Any = None

    # ---- one optimizer step ------------------------------------------------------------------------------
    def train_step(self, step: int, track_logits: bool) -> StepStats:
        t, world = self.recipe.train, self.dist.world_size
        batches = [
            self.train_rows.inputs_and_labels(self.order.rows(step, m, self.dist.rank)) for m in range(t.grad_accum)
        ]
        n_targets = torch.tensor(float(sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)))
        n_targets = all_reduce_(n_targets, self.dist).clamp(min=1.0)
        for a in self.attn:
            a.track_max_logits = track_logits
        ce_total, aux_total = torch.zeros(()), torch.zeros(())
        load = torch.zeros(len(self.moe), self.config.n_routed_experts or 0)
        max_logits = torch.full((len(self.attn), self.config.num_attention_heads), -math.inf)
        for m, (x, y) in enumerate(batches):
            x, y = x.to(self.device), y.to(self.device)
            last = m == t.grad_accum - 1
            no_sync = self.ddp_model.no_sync() if self.dist.enabled and not last else contextlib.nullcontext()
            with no_sync:
                with self.autocast:
                    logits = self.ddp_model(x)
                ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="sum")
                aux = sum((e.aux_loss for e in self.moe if e.aux_loss is not None), torch.zeros((), device=ce.device))
                # DDP averages gradients over ranks: scaling by world makes the CE term the global token mean
                loss = ce * (world / n_targets.item()) + aux / t.grad_accum
                loss.backward()
            ce_total += ce.detach().float().cpu()
            aux_total += aux.detach().float().cpu() / t.grad_accum
            for j, mlp in enumerate(self.moe):
                load[j] += mlp.last_expert_load.float().cpu()
            if track_logits:
                for i, a in enumerate(self.attn):
                    max_logits[i] = torch.maximum(max_logits[i], a.max_logits.float().cpu())
        ce_total, aux_total = all_reduce_(ce_total, self.dist), all_reduce_(aux_total, self.dist) / world
        load = all_reduce_(load, self.dist)
        grad_norm = self.clip_gradients(t.grad_clip or math.inf)
        self.optimizer.step()
        clip_stats: dict[str, Any] = {}
        if track_logits:
            max_logits = all_reduce_(max_logits, self.dist, op="max")
            if self.qk_clip is not None:
                clip_stats = self.qk_clip(max_logits)
        self.optimizer.zero_grad(set_to_none=True)
        self.update_router_bias(load)
        return StepStats(
            loss=(ce_total / n_targets).item(),
            aux_loss=aux_total.item(),
            grad_norm=float(grad_norm),
            tokens=int(n_targets.item()),
            max_logit=max_logits.amax(dim=1).tolist() if track_logits else [],
            expert_load=load,
            qk_clip=clip_stats,
        )

    @torch.no_grad()
    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Scale gradients to a global L2 norm <= max_norm; return the norm before clipping."""
        if not self.ep:
            params = [p for p in self.model.parameters() if p.grad is not None]
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        local = set(self.local_experts)
        named = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
        experts = [p for n, p in named if n in local]
        for p in experts:  # summed over every rank's loss by the all-to-all backward; DDP averages the rest
            p.grad.div_(self.dist.world_size)
        sq = torch.zeros((), dtype=torch.float64)
        sq_experts = torch.zeros((), dtype=torch.float64)
        for n, p in named:
            if n in local:
                sq_experts += p.grad.double().square().sum().cpu()
            else:
                sq += p.grad.double().square().sum().cpu()
        norm = (sq + all_reduce_(sq_experts, self.dist)).sqrt().float()
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            for _, p in named:
                p.grad.mul_(coef.to(p.grad))
        return norm

    @torch.no_grad()
    def update_router_bias(self, load: torch.Tensor) -> None:
        gamma = self.recipe.train.moe_bias_update_speed
        if gamma == 0:
            return
        for j, mlp in enumerate(self.moe):
            bias = mlp.gate.e_score_correction_bias
            bias += gamma * torch.sign(load[j].mean() - load[j]).to(bias)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token CE on the first eval_batches micro-batches of the validation rows.

        Data parallel: the batches are shared out over the ranks. Expert parallel: every rank runs every batch, as the
        all-to-all needs every rank in every forward.
        """
        if self.val_rows is None:
            return None
        t = self.recipe.train
        self.model.eval()
        ce, n = torch.zeros(()), torch.zeros(())
        for a in self.attn:
            a.track_max_logits = False
        starts = range(0, len(self.val_rows), t.micro_batch)
        for i, s in enumerate(list(starts)[: t.eval_batches]):
            if not self.ep and i % self.dist.world_size != self.dist.rank:
                continue
            x, y = self.val_rows.inputs_and_labels(torch.arange(s, min(s + t.micro_batch, len(self.val_rows))))
            with self.autocast:
                logits = self.model(x.to(self.device))
            ce += F.cross_entropy(logits.float().flatten(0, 1), y.to(self.device).flatten(),
                                  ignore_index=IGNORE_INDEX, reduction="sum").cpu()
            n += (y != IGNORE_INDEX).sum()
        self.model.train()
        if not self.ep:
            ce, n = all_reduce_(ce, self.dist), all_reduce_(n, self.dist)
        return (ce / n.clamp(min=1)).item()

    # ---- run ---------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the latest checkpoint, or from step 0 when there is none."""
        ckpt = checkpointing.latest_checkpoint(self.out)
        if ckpt is not None:
            state = checkpointing.load_checkpoint(ckpt, self.model, self.optimizer,
                                                  self.dist.rank if self.ep else None)
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        if self.dist.is_main:
            self._truncate_log(self.step)
            if ckpt is not None:
                print(f"resumed from {ckpt} at step {self.step}")

    def _truncate_log(self, step: int) -> None:
        """Drop log lines past `step`: a killed run may have logged steps that are redone now (all of them, when it
        died before its first checkpoint)."""
        log = self.out / "log.jsonl"
        if log.exists():
            kept = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            log.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])
                elif isinstance(v, list) and v and isinstance(v[0], int | float):
                    for i, x in enumerate(v):
                        self.tb.add_scalar(f"{k}/{i}", x, record["step"])

    def save(self) -> None:
        t = self.recipe.train
        state = {"tokens_seen": self.tokens_seen}
        if not self.ep:
            if self.dist.is_main:
                checkpointing.save_checkpoint(self.out, self.step, self.model, self.optimizer, state, t.keep_last)
            barrier(self.dist)
            return
        # expert parallel: every rank writes its shard into the temp folder; rank 0 then commits it
        tmp = self.out / "checkpoints" / f".tmp_step_{self.step:08d}"
        if self.dist.is_main:
            tmp = checkpointing.begin_checkpoint(self.out, self.step)
        barrier(self.dist)
        model_file, optim_file = checkpointing.shard_names(self.dist.rank)
        checkpointing.write_files(tmp, {model_file: self.model.state_dict(), optim_file: self.optimizer.state_dict()})
        barrier(self.dist)
        if self.dist.is_main:
            checkpointing.write_files(tmp, {"state.pt": {**state, "step": self.step, "rng": checkpointing.rng_state()}})
            checkpointing.commit_checkpoint(self.out, self.step, tmp, t.keep_last)
        barrier(self.dist)

    def export(self) -> Path:
        final = self.out / "final"
        full = gather_full_state_dict(self.model) if self.ep else self.model.state_dict()
        if self.dist.is_main:  # the tokenizer files go into the same atomic write as the weights
            tokenizer = [f for f in Path(self.recipe.data.tokenizer).iterdir() if f.is_file()
                         and not is_weight_file(f.name)] if self.recipe.data.tokenizer else []
            save_state_dict(full, final, self.config, fp8=self.recipe.train.export_fp8, extra_files=tokenizer)
        barrier(self.dist)
        return final

    def fit(self) -> dict[str, Any]:
        t, total = self.recipe.train, self.recipe.schedule.total_steps
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            checkpointing.remove_interrupted(self.out)  # what a run killed mid-save or mid-export left
            remove_interrupted_writes(self.out / "final")
            (self.out / "recipe.json").write_text(json.dumps(self.recipe.to_dict(), indent=2) + "\n")
            if t.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:
                    raise ImportError("[train] tensorboard = true needs the 'tensorboard' package") from e
                self.tb = SummaryWriter(str(self.out / "tensorboard"))
        barrier(self.dist)
        self.resume()
        finished_before = self.step >= total  # a rerun of a finished run only (re-)exports
        bar = tqdm(total=total, initial=self.step, disable=not (t.progress and self.dist.is_main), desc="train")
        last: dict[str, Any] = {}
        t0, tokens0 = time.perf_counter(), self.tokens_seen
        while self.step < total:
            lr = set_lr(self.optimizer, self.schedule, self.step)
            logging_step = (self.step + 1) % t.log_every == 0 or self.step + 1 == total
            stats = self.train_step(self.step, track_logits=self.qk_clip is not None or logging_step)
            self.step += 1
            self.tokens_seen += stats.tokens
            if not math.isfinite(stats.loss):
                raise FloatingPointError(f"loss is {stats.loss} at step {self.step}")
            if logging_step:
                load = stats.expert_load
                mean = load.mean(dim=1, keepdim=True).clamp(min=1e-9)
                last = {
                    "step": self.step, "tokens": self.tokens_seen, "loss": stats.loss, "aux_loss": stats.aux_loss,
                    "lr": lr, "grad_norm": stats.grad_norm, "max_logit": stats.max_logit,
                    # MaxVio (DeepSeek-V3 / Loss-Free Balancing): (max_e load_e - mean) / mean, per MoE layer
                    "expert_maxvio": ((load.amax(dim=1, keepdim=True) - mean) / mean).squeeze(1).tolist(),
                    "tokens_per_s": (self.tokens_seen - tokens0) / max(time.perf_counter() - t0, 1e-9),
                    **{f"qk_clip_{k}": v for k, v in stats.qk_clip.items()},
                }
                self.log(last)
                bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{lr:.2e}")
            if t.eval_every and self.step % t.eval_every == 0 and self.step < total:
                self.log({"step": self.step, "tokens": self.tokens_seen, "val_loss": self.evaluate()})
            if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step < total:
                self.save()
            bar.update(1)
        bar.close()
        if not finished_before:
            val = self.evaluate()
            if val is not None:
                self.log({"step": self.step, "tokens": self.tokens_seen, "val_loss": val})
                last["val_loss"] = val
            self.save()
        if t.export:
            last["export"] = str(self.export())
        if self.tb is not None:
            self.tb.close()
        return last if self.dist.is_main else {}


def train(recipe: Recipe) -> dict[str, Any]:
    info = init_distributed()
    try:
        return Trainer(recipe, info).fit()
    finally:
        shutdown()
