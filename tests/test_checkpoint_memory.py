"""Loading a checkpoint holds one copy of its weights: the peak RSS a load adds is the model's own bytes plus at most
one tensor's temporaries, not a second copy of the checkpoint (safetensors' mmap pages kept mapped while a shard is
read, or tensors replaced in the heap and never given back). Measured in a fresh process: VmHWM, reset with
/proc/self/clear_refs just before the load, against the resident set before it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kimi_k2.config import K2Config
from kimi_k2.model import K2ForCausalLM

MIB = 2**20
SLACK = 12 * MIB  # allocator and interpreter noise of a load, independent of the weights' size

MEASURE = """
import json, sys
from pathlib import Path
import torch
from kimi_k2.engine.loader import load_model

def status(key):
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024

quantization = sys.argv[2] or None
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
before = status("VmRSS")
model = load_model(sys.argv[1], torch.float32, quantization=quantization)
seen, held = set(), 0
for t in [*model.parameters(), *model.buffers()]:
    if t.untyped_storage().data_ptr() not in seen:
        seen.add(t.untyped_storage().data_ptr())
        held += t.untyped_storage().nbytes()
print(json.dumps({"growth": status("VmHWM") - before, "held": held}))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int]:
    """k2-small with random weights, saved as fp32 (~40 MiB) -> (directory, bytes of its tensors, of the largest)."""
    torch.manual_seed(0)
    model = K2ForCausalLM.from_config(K2Config.from_preset("k2-small"), torch.float32)
    d = tmp_path_factory.mktemp("ckpt") / "k2-small"
    model.config.torch_dtype = "float32"
    model.save_pretrained(d)
    sizes = [t.numel() * t.element_size() for t in model.state_dict().values()]
    return d, sum(sizes), max(sizes)


def measure(directory: Path, quantization: str | None) -> dict[str, int]:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    out = subprocess.run([sys.executable, "-c", MEASURE, str(directory), quantization or ""], check=True,
                         capture_output=True, text=True, timeout=300).stdout
    return json.loads(out.splitlines()[-1])


def test_fp32_load_holds_one_copy_of_the_weights(checkpoint: tuple[Path, int, int]) -> None:
    directory, nbytes, _ = checkpoint
    got = measure(directory, None)
    assert got["held"] == nbytes
    # read straight into the model's tensors: the peak adds the weights once; a second copy would add 2 * nbytes
    assert got["growth"] <= 1.2 * nbytes + SLACK, (got["growth"] / MIB, nbytes / MIB)


def test_int8_load_never_holds_the_fp32_model(checkpoint: tuple[Path, int, int]) -> None:
    directory, nbytes, largest = checkpoint
    got = measure(directory, "int8")
    assert got["held"] < 0.3 * nbytes  # 8.5 bits per weight, the embedding included
    # one fp32 tensor at a time: read, quantized (`quantize_int8` makes ~4 temporaries of its size), dropped. The fp32
    # model held (or mapped) beside the int8 one breaks this bound
    assert got["growth"] <= got["held"] + 5 * largest + SLACK, (got["growth"] / MIB, got["held"] / MIB)
