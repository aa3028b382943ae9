"""The training loop: pretraining or SFT of K2ForCausalLM from a Recipe, single process or data parallel.

One optimizer step t:
  for each micro-batch m: loss_m = sum of token CE / (targets in the global batch) + MoE seq-aux loss / grad_accum
  clip the gradient norm, optimizer.step(), QK-Clip from the step's per-head max logits (muonclip)
  aux-loss-free balancing (DeepSeek-V3 §2.1.2): b_e += gamma * sign(mean(load) - load_e), load summed over the
  step's micro-batches and ranks
Logs go to OUT/log.jsonl (and TensorBoard when asked); checkpoints to OUT/checkpoints; the final model to OUT/final.
Under torchrun the ranks train data parallel, or FSDP2-sharded with expert parallelism (`layout.py`, from the recipe's
[parallel] section). Every rank writes its shards of each checkpoint into train.out_dir (`checkpointing.py`), so
across machines out_dir must be on a filesystem every node sees; a run resumes on any layout and world size that
keeps its global batch (micro_batch x grad_accum x ranks).
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
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from kimi_k2.checkpoint import ShardWriter
from kimi_k2.checkpoint.reader import FP32_TENSORS
from kimi_k2.checkpoint.writer import checkpoint_config, is_weight_file, prepare, remove_interrupted_writes
from kimi_k2.model import K2ForCausalLM
from kimi_k2.parallel import DistInfo, all_reduce_, barrier, init_distributed, shutdown
from kimi_k2.parallel.fsdp import load_sharded, stream_full_state_dict
from kimi_k2.train import checkpointing
from kimi_k2.train.data import IGNORE_INDEX, BatchOrder, PackedRows, expand_paths, load_pretrain, load_sft
from kimi_k2.train.layout import Layout, uses_fsdp
from kimi_k2.train.memory import RankMemory, measure
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
        # FSDP2 from a checkpoint: shard on the meta device, then each rank reads only its rows (no rank ever holds
        # the model); a random init is drawn whole on every rank (the same values as one process) and then sharded
        sharded_load = recipe.model.init_from is not None and uses_fsdp(recipe.parallel, self.dist)
        if sharded_load:
            with torch.device("meta"):
                self.model = K2ForCausalLM(self.config)
        elif recipe.model.init_from:
            self.model = K2ForCausalLM.from_pretrained(recipe.model.init_from, dtype=torch.float32)
        else:
            self.model = K2ForCausalLM.from_config(self.config, dtype=torch.float32)
        if not sharded_load:
            self.model.to(self.device)
        self.model.train()
        freeze(self.model, t.freeze)
        self.layout = Layout(self.model, recipe.parallel, t.expert_parallel, self.dist)
        if sharded_load:
            self.model.to_empty(device=self.device)
            load_sharded(self.model, recipe.model.init_from)
        self.optimizer, self.qk_clip = build_optimizer(self.model, recipe.optim)
        self.memory: list[RankMemory] | None = None  # every rank's, measured in the first step
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
            with self.layout.sync(last):
                with self.autocast:
                    logits = self.layout.forward_model(x)
                ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="sum")
                aux = sum((e.aux_loss for e in self.moe if e.aux_loss is not None), torch.zeros((), device=ce.device))
                # DDP / FSDP average gradients over ranks: scaling by world makes the CE term the global token mean
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
        self.layout.drop_idle_expert_grads(load)
        grad_norm = self.layout.clip_gradients(t.grad_clip or math.inf)
        self.optimizer.step()
        clip_stats: dict[str, Any] = {}
        if track_logits:
            max_logits = all_reduce_(max_logits, self.dist, op="max")
            if self.qk_clip is not None:
                clip_stats = self.qk_clip(max_logits)
        if self.memory is None:
            mine = measure(self.model, self.optimizer, self.layout.local_experts, self.layout.ep,
                           self.dist.world_size if self.layout.fsdp else 1)
            self.memory = [mine] if not self.dist.enabled else [None] * self.dist.world_size
            if self.dist.enabled:
                dist.all_gather_object(self.memory, mine)
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
    def update_router_bias(self, load: torch.Tensor) -> None:
        gamma = self.recipe.train.moe_bias_update_speed
        if gamma == 0:
            return
        for j, mlp in enumerate(self.moe):
            bias = mlp.gate.e_score_correction_bias
            bias += gamma * torch.sign(load[j].mean() - load[j]).to(bias)

    def evaluate(self) -> float | None:
        """Mean token CE on the first eval_batches micro-batches of the validation rows, shared out over the ranks.

        Every rank runs the same number of forwards (under FSDP2 and expert parallelism a forward is collective): a
        rank with no batch left in a round runs the round's first one and does not count it.
        """
        if self.val_rows is None:
            return None
        t, world, rank = self.recipe.train, self.dist.world_size, self.dist.rank
        self.model.eval()
        ce, n = torch.zeros(()), torch.zeros(())
        for a in self.attn:
            a.track_max_logits = False
        starts = list(range(0, len(self.val_rows), t.micro_batch))[: t.eval_batches]
        for first in range(0, len(starts), world):
            mine = first + rank < len(starts)
            s = starts[first + rank] if mine else starts[first]
            x, y = self.val_rows.inputs_and_labels(torch.arange(s, min(s + t.micro_batch, len(self.val_rows))))
            with self.layout.eval_mode(), self.autocast:
                logits = self.model(x.to(self.device)).detach()
            if mine:
                ce += F.cross_entropy(logits.float().flatten(0, 1), y.to(self.device).flatten(),
                                      ignore_index=IGNORE_INDEX, reduction="sum").cpu()
                n += (y != IGNORE_INDEX).sum()
        self.model.train()
        ce, n = all_reduce_(ce, self.dist), all_reduce_(n, self.dist)
        return (ce / n.clamp(min=1)).item()

    # ---- run ---------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the latest checkpoint, or from step 0 when there is none."""
        ckpt = checkpointing.latest_checkpoint(self.out)
        if ckpt is not None:
            state = checkpointing.load_checkpoint(ckpt, self.model, self.optimizer)
            saved = state.get("global_batch", self.order.global_batch)
            if saved != self.order.global_batch:
                raise ValueError(f"{ckpt} was written with a global batch of {saved} rows; this run's is "
                                 f"{self.order.global_batch} (micro_batch x grad_accum x {self.dist.world_size} "
                                 "ranks): set train.grad_accum / micro_batch so that it stays the same")
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
        state = {"tokens_seen": self.tokens_seen, "samples": self.step * self.order.global_batch,
                 "global_batch": self.order.global_batch, "layout": json.dumps(self.layout.describe())}
        checkpointing.save_checkpoint(self.out, self.step, self.model, self.optimizer, state,
                                      self.recipe.train.keep_last)

    def export(self) -> Path:
        """The final model in the HF layout (block-FP8 with train.export_fp8), streamed one full tensor at a time
        into rank 0's writer: no rank ever holds the whole model (`stream_full_state_dict`)."""
        final = self.out / "final"
        with torch.device("meta"):
            names = list(K2ForCausalLM(self.config).state_dict())
        fp8 = self.recipe.train.export_fp8
        writer = ShardWriter(final) if self.dist.is_main else None
        with writer or contextlib.nullcontext():
            dtype = None
            for name, t in stream_full_state_dict(self.model, names):
                if writer is not None:
                    dtype = dtype or (t.dtype if t.is_floating_point() and not name.endswith(FP32_TENSORS) else None)
                    writer.add(prepare(name, t.cpu(), fp8))
            if writer is not None:  # the tokenizer files go into the same atomic write as the weights
                tokenizer = [f for f in Path(self.recipe.data.tokenizer).iterdir() if f.is_file()
                             and not is_weight_file(f.name)] if self.recipe.data.tokenizer else []
                writer.commit(checkpoint_config(self.config, fp8, dtype), tokenizer)
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
                if self.step == 1 and self.memory is not None:
                    last |= {"layout": self.layout.describe(), "memory": [m.as_dict() for m in self.memory]}
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
