"""Checkpoint I/O: Hugging Face safetensors layout, block-FP8 (DeepSeek-V3 / Kimi K2 convention), lazy loading."""

from kimi_k2.checkpoint.fp8 import dequantize_block_fp8, is_quantized_name, quantize_block_fp8
from kimi_k2.checkpoint.loading import load_into
from kimi_k2.checkpoint.reader import CheckpointError, CheckpointReader, Slice
from kimi_k2.checkpoint.writer import ShardWriter, save_state_dict

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "ShardWriter",
    "Slice",
    "dequantize_block_fp8",
    "is_quantized_name",
    "load_into",
    "quantize_block_fp8",
    "save_state_dict",
]
