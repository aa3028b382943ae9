"""Training: the MuonClip optimizer (Muon + AdamW + QK-Clip) and the K2 parameter split."""

from kimi_k2.train.muonclip import MuonClip, zeropower_via_newtonschulz5
from kimi_k2.train.param_groups import param_groups
from kimi_k2.train.qk_clip import QKClip, QKClipStats

__all__ = ["MuonClip", "QKClip", "QKClipStats", "param_groups", "zeropower_via_newtonschulz5"]
