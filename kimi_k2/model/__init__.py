"""The Kimi K2 / DeepSeek-V3 model: MLA attention, YaRN rope, aux-loss-free MoE."""

from .transformer import K2ForCausalLM, K2Model

__all__ = ["K2ForCausalLM", "K2Model"]
