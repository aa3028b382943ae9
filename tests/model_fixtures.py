"""A k2-tiny model with random weights of unit-scale rows and a random router bias, shared by the fast-path tests."""

import torch

from kimi_k2.config import K2Config
from kimi_k2.model import K2ForCausalLM
from kimi_k2.model.moe import MoE


def random_tiny_model(**overrides) -> K2ForCausalLM:
    torch.manual_seed(0)
    model = K2ForCausalLM.from_config(K2Config.from_preset("k2-tiny").replace(**overrides), torch.float32)
    with torch.no_grad():
        for t in model.parameters():
            t.normal_(0.0, t.shape[-1] ** -0.5) if t.ndim == 2 else t.uniform_(0.5, 1.5)
        for m in model.modules():
            if isinstance(m, MoE):
                m.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    return model.eval()
