"""Training recipe: a TOML file with [model], [data], [optim], [schedule], [train] and [parallel] sections.

Unknown sections or keys are errors naming the key. Relative input paths (data, tokenizer, model config, init_from)
are resolved against the recipe file's folder; train.out_dir is relative to the working directory.
`overrides` like "train.lr=3e-4" (TOML values) are applied before validation.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kimi_k2.config import K2Config
from kimi_k2.train.schedules import Schedule


@dataclass
class ModelSection:
    preset: str | None = None  # a K2Config preset name ...
    config: str | None = None  # ... or a config.json / model directory
    init_from: str | None = None  # start from these weights (HF layout) instead of a random init
    overrides: dict[str, Any] = field(default_factory=dict)  # config.json fields to change

    def build_config(self) -> K2Config:
        """The preset, the config file, or else the config of init_from; then the overrides."""
        if self.preset is not None and self.config is not None:
            raise ValueError("[model] sets both preset and config; use one")
        source = self.preset or self.config or self.init_from
        if source is None:
            raise ValueError("[model] needs preset = NAME, config = PATH or init_from = DIR")
        cfg = K2Config.from_preset(self.preset) if self.preset else K2Config.from_pretrained(source)
        return cfg.replace(**self.overrides) if self.overrides else cfg


@dataclass
class DataSection:
    kind: str = "pretrain"  # "pretrain" | "sft"
    paths: list[str] = field(default_factory=list)
    seq_len: int = 256
    tokenizer: str | None = None
    val_fraction: float = 0.0
    workers: int = 1  # processes that tokenize SFT conversations (rendering the chat template is ~3 ms each)


@dataclass
class OptimSection:
    name: str = "muonclip"  # "muonclip" | "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    momentum: float = 0.95
    qk_clip_tau: float | None = 100.0  # QK-Clip threshold (muonclip only); null disables


@dataclass
class ScheduleSection:
    kind: str = "wsd"  # "wsd" | "cosine" | "constant"
    warmup_steps: int = 0
    total_steps: int = 100
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.1


@dataclass
class TrainSection:
    out_dir: str = "runs/default"
    micro_batch: int = 8
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    seed: int = 0
    dtype: str = "float32"  # "float32" | "bfloat16" (autocast over fp32 master weights)
    deterministic: bool = False
    threads: int | None = None
    log_every: int = 1
    eval_every: int = 0  # 0: only at the end (when there is a validation split)
    eval_batches: int = 4
    ckpt_every: int = 0  # 0: no intermediate checkpoints
    keep_last: int = 2
    moe_bias_update_speed: float = 1e-3  # gamma of the aux-loss-free bias update
    # parameters whose names contain one of these stay as loaded, e.g. ["embed_tokens", "lm_head"] in SFT so the
    # output rows of tokens the SFT data never targets keep their pretrained directions (experiments/README.md)
    freeze: list[str] = field(default_factory=list)
    expert_parallel: bool = False  # under torchrun: shard the routed experts over the ranks (all-to-all dispatch)
    export: bool = True  # write the final model in HF layout to out_dir/final
    export_fp8: bool = False
    tensorboard: bool = False
    progress: bool = True


@dataclass
class ParallelSection:
    """How the ranks of a torchrun world split the model (kimi_k2.parallel). dp_shard = 1: data parallel (DDP), every
    rank a full replica (train.expert_parallel shards the routed experts over all ranks); dp_shard = N (the world
    size, or -1 for it): FSDP2, parameters, gradients and optimizer state sharded N ways, with the routed experts
    split over ep ranks (ep divides N) and FSDP-sharded over the other N / ep."""

    dp_shard: int = 1
    ep: int = 1
    # FSDP2 mixed precision: the dtype of the gathered parameters forward and backward run in (masters stay fp32,
    # gradients are reduced in fp32); "auto": bfloat16 on a GPU that has it, else float32
    param_dtype: str = "auto"
    reshard_after_forward: bool = True  # free gathered parameters after forward (ZeRO-3); false: keep them (ZeRO-2)
    activation_checkpointing: bool = False  # FSDP2: keep each block's input only, recompute its forward in backward


SECTIONS = {
    "model": ModelSection,
    "data": DataSection,
    "optim": OptimSection,
    "schedule": ScheduleSection,
    "train": TrainSection,
    "parallel": ParallelSection,
}


@dataclass
class Recipe:
    model: ModelSection
    data: DataSection
    optim: OptimSection
    schedule: ScheduleSection
    train: TrainSection
    parallel: ParallelSection = field(default_factory=ParallelSection)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base_dir: Path | None = None) -> Recipe:
        unknown = set(raw) - set(SECTIONS)
        if unknown:
            raise ValueError(f"recipe has unknown sections {sorted(unknown)}; expected {sorted(SECTIONS)}")
        parts = {}
        for name, kind in SECTIONS.items():
            sec = dict(raw.get(name, {}))
            fields = {f.name for f in dataclasses.fields(kind)}
            bad = set(sec) - fields
            if bad:
                raise ValueError(f"recipe [{name}] has unknown keys {sorted(bad)}; expected some of {sorted(fields)}")
            parts[name] = kind(**sec)
        recipe = cls(**parts)
        if base_dir is not None:
            recipe._resolve(base_dir)
        recipe.validate()
        return recipe

    @classmethod
    def from_toml(cls, path: str | Path, overrides: list[str] | None = None) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} not found")
        with path.open("rb") as f:
            try:
                raw = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"recipe {path} is not valid TOML: {e}") from e
        for item in overrides or []:
            apply_override(raw, item)
        return cls.from_dict(raw, base_dir=path.parent)

    def _resolve(self, base: Path) -> None:
        def res(p: str | None) -> str | None:
            return None if p is None else str(p if Path(p).is_absolute() else base / p)

        self.data.paths = [res(p) for p in self.data.paths]  # type: ignore[misc]
        self.data.tokenizer = res(self.data.tokenizer)
        self.model.config = res(self.model.config)
        self.model.init_from = res(self.model.init_from)

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid recipe: {msg}")

        need(self.data.kind in ("pretrain", "sft"), f"[data] kind {self.data.kind!r} must be 'pretrain' or 'sft'")
        need(bool(self.data.paths), "[data] paths is empty")
        need(self.data.seq_len >= 1, "[data] seq_len must be >= 1")
        need(self.data.kind != "sft" or self.data.tokenizer is not None, "[data] kind = 'sft' needs tokenizer = DIR")
        need(0.0 <= self.data.val_fraction < 1.0, "[data] val_fraction must be in [0, 1)")
        need(self.data.workers >= 1, "[data] workers must be >= 1")
        need(self.optim.name in ("muonclip", "adamw"), f"[optim] name {self.optim.name!r} must be muonclip or adamw")
        need(self.optim.lr > 0, "[optim] lr must be > 0")
        need(len(self.optim.betas) == 2, "[optim] betas must have two entries")
        need(self.optim.qk_clip_tau is None or self.optim.qk_clip_tau > 0, "[optim] qk_clip_tau must be > 0")
        t = self.train
        need(t.micro_batch >= 1 and t.grad_accum >= 1, "[train] micro_batch and grad_accum must be >= 1")
        need(t.dtype in ("float32", "bfloat16"), f"[train] dtype {t.dtype!r} must be float32 or bfloat16")
        need(t.grad_clip is None or t.grad_clip > 0, "[train] grad_clip must be > 0 (or absent)")
        need(t.keep_last >= 1, "[train] keep_last must be >= 1")
        need(t.log_every >= 1, "[train] log_every must be >= 1")
        need(t.ckpt_every >= 0 and t.eval_every >= 0, "[train] ckpt_every and eval_every must be >= 0")
        need(t.moe_bias_update_speed >= 0, "[train] moe_bias_update_speed must be >= 0")
        par = self.parallel
        need(par.dp_shard >= 1 or par.dp_shard == -1, "[parallel] dp_shard must be >= 1, or -1 for the world size")
        need(par.ep >= 1, "[parallel] ep must be >= 1")
        need(par.ep == 1 or par.dp_shard != 1, "[parallel] ep > 1 needs FSDP2 (dp_shard > 1 or -1); with data "
                                               "parallel use train.expert_parallel = true")
        need(par.dp_shard == 1 or not t.expert_parallel, "[train] expert_parallel is the data-parallel (dp_shard = 1) "
                                                         "way; under FSDP2 set [parallel] ep")
        need(par.param_dtype in ("auto", "float32", "bfloat16"),
             f"[parallel] param_dtype {par.param_dtype!r} must be auto, float32 or bfloat16")
        need(par.dp_shard != 1 or not par.activation_checkpointing,
             "[parallel] activation_checkpointing is built for FSDP2 (dp_shard > 1 or -1)")
        need(par.dp_shard == 1 or t.dtype == "float32", "[train] dtype = 'bfloat16' (autocast) is the data-parallel "
                                                        "way; under FSDP2 set [parallel] param_dtype")
        self.model.build_config()
        Schedule(**vars(self.schedule))

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply "section.key=value" (value in TOML syntax, or a bare string) to a raw recipe dict."""
    key, sep, value = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise ValueError(f"override {item!r} must look like section.key=value")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    raw.setdefault(section, {})[name] = parsed
