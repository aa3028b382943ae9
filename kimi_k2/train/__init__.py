"""Training: the MuonClip optimizer (Muon + AdamW + QK-Clip, distributed Newton-Schulz on FSDP2 shards) and the K2
parameter split; the trainer (recipes, packed data, WSD/cosine schedules, sharded atomic checkpoints that reshard,
data parallel or FSDP2 + expert parallel)."""

from kimi_k2.train.muonclip import MuonClip, zeropower_via_newtonschulz5
from kimi_k2.train.param_groups import param_groups
from kimi_k2.train.qk_clip import QKClip, QKClipStats
from kimi_k2.train.recipe import Recipe
from kimi_k2.train.schedules import Schedule
from kimi_k2.train.trainer import Trainer, train

__all__ = ["MuonClip", "QKClip", "QKClipStats", "Recipe", "Schedule", "Trainer", "param_groups", "train",
           "zeropower_via_newtonschulz5"]
