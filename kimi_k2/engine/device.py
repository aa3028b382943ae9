"""Which device an engine runs on: `--device` of generate/bench/chat/serve, resolved once at start-up."""

from __future__ import annotations

import torch


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """None or "auto": CUDA (the current device) when available, else the CPU; otherwise the device named, checked.

    Raises ValueError naming the problem for an unknown device string or a CUDA device this process cannot use.
    """
    if spec is None or spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"unknown device {spec!r} (expected cpu, cuda or cuda:N): {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r}: CUDA is not available to this PyTorch ({torch.__version__}, built for "
                             f"CUDA {torch.version.cuda}); use --device cpu")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA devices are visible")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"device {spec!r}: the engine runs on cpu or cuda, not {device.type}")
    return device
