"""AOTInductor decode (`EngineConfig(decode_backend="aoti")`): decode steps through a DecodeStep compiled ahead of time.

`kimi_k2.model.decode.DecodeStep` is exported (`torch.export`, the weights as inputs: the graph depends on the model
config, the page size and each weight's dtype, shape and strides, never on weight values) and compiled by AOTInductor
into a .pt2 package in a subprocess, so the serving process never imports dynamo, inductor or sympy. The package is
cached on disk (`$KIMI_K2_CACHE/aoti`, keyed by everything the graph depends on: `package_key`), so a later engine of
the same model shape only loads it. The process runs it with torch's C++ runner (`torch._C._aoti`) and each step is one
call into it: no guards, no Python dispatch. One graph serves every batch size (B >= 1), context length (pages) and
pool size: all three are dynamic dims of the export. The custom linears (`kimi_k2::linear_*`) run through
AOTInductor's proxy executor, which calls the kernels registered in this process.

The weights are laid out in place first (`prepare_decode_layout`) and passed as the flat list of `decode_weights`'
tensors (views of the model's own), so nothing is copied.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

import kimi_k2
from kimi_k2.config import K2Config
from kimi_k2.engine.decode_inputs import WatchedWeights
from kimi_k2.engine.paged_cache import LatentPool, Row
from kimi_k2.model.decode import DecodeStep, Packed, check_decode_model, prepare_decode_layout
from kimi_k2.ops import kernels

log = logging.getLogger(__name__)

MAX_BATCH, MAX_PAGES, MAX_POOL_ROWS = 4096, 1 << 20, 1 << 40  # the dynamic dims' export ranges
GRAPH_SOURCES = ("model", "ops")  # kimi_k2 folders whose code the graph is traced from


def describe(w: Any) -> Any:
    """The weights' structure as JSON: each tensor's dtype, shape and strides (what the graph is compiled for)."""
    if isinstance(w, torch.Tensor):
        return {"tensor": [str(w.dtype).removeprefix("torch."), list(w.shape), list(w.stride())]}
    if isinstance(w, Packed):
        return {"packed": [describe(v) for v in w]}
    if isinstance(w, dict):
        return {"dict": {k: describe(v) for k, v in w.items()}}
    if isinstance(w, (list, tuple)):
        return {type(w).__name__: [describe(v) for v in w]}
    if w is None:
        return None
    raise TypeError(f"decode weights hold a {type(w).__name__}")


def placeholders(d: Any) -> Any:
    """Weights of the structure `describe` gave: empty tensors of those dtypes, shapes and strides (the export reads
    only their metadata; `build_package` makes them fake tensors, which hold no memory)."""
    if d is None:
        return None
    (kind, v), = d.items()
    if kind == "tensor":
        return torch.empty_strided(v[1], v[2], dtype=getattr(torch, v[0]))
    if kind == "packed":
        return Packed(*map(placeholders, v))
    if kind == "dict":
        return {k: placeholders(x) for k, x in v.items()}
    return {"list": list, "tuple": tuple}[kind](map(placeholders, v))


def package_key(job: dict[str, Any]) -> str:
    """sha256 of what the compiled graph depends on: the build job (config, page size, weight structure), the traced
    code (kimi_k2's model and ops sources, this file), torch's version and the CPU's ISA (the C++ is built for it)."""
    h = hashlib.sha256(json.dumps([job, torch.__version__, platform.machine(), torch.backends.cpu.get_cpu_capability()],
                                  sort_keys=True).encode())
    root = Path(kimi_k2.__file__).parent
    for path in sorted(p for d in GRAPH_SOURCES for p in (root / d).rglob("*.py")) + [Path(__file__)]:
        h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()[:24]


class FlatStep(nn.Module):
    """DecodeStep over the weights' flat tensor list (what the C++ runner is called with)."""

    def __init__(self, step: DecodeStep, tree: pytree.TreeSpec) -> None:
        super().__init__()
        self.step, self.tree = step, tree

    def forward(self, flat: list[torch.Tensor], tokens: torch.Tensor, positions: torch.Tensor, pages: torch.Tensor,
                kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.step(pytree.tree_unflatten(flat, self.tree), tokens, positions, pages, kv)


def build_package(job: dict[str, Any], out: Path) -> None:
    """Export + AOTInductor-compile the decode graph of a build job (what `AotDecoder` writes) into `out`."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.export import Dim

    config = K2Config.from_dict(job["config"])
    with FakeTensorMode(allow_non_fake_inputs=True):  # no weight memory, whatever the model's size
        flat, tree = pytree.tree_flatten(placeholders(job["weights"]))
    page_size, width = job["page_size"], config.kv_lora_rank + config.qk_rope_head_dim
    step = FlatStep(DecodeStep(config, job["attention_factor"], page_size), tree)
    # example sizes of 2+ so the export keeps them symbolic (the graph then holds for B >= 1, pages >= 1)
    args = (flat, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
            torch.zeros(2, 2, dtype=torch.long), torch.zeros(config.num_hidden_layers, 4 * page_size, width))
    batch, pages = Dim("batch", min=1, max=MAX_BATCH), Dim("pages", min=1, max=MAX_PAGES)
    pool_rows = Dim("pool_rows", min=page_size, max=MAX_POOL_ROWS)
    dynamic = ([None] * len(flat), {0: batch}, {0: batch}, {0: batch, 1: pages}, {1: pool_rows})
    with torch.inference_mode():
        program = torch.export.export(step, args, dynamic_shapes=dynamic, strict=False)
    torch._inductor.aoti_compile_and_package(program, package_path=str(out))


def cache_root() -> Path:
    return kernels.cache_dir() / "aoti"


def package(job: dict[str, Any]) -> tuple[Path, float | None]:
    """The cached package of a build job, built first in a subprocess if missing -> (path, build seconds or None)."""
    path = cache_root() / f"decode-{package_key(job)}.pt2"
    if path.is_file():
        return path, None
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        env = dict(os.environ)
        root = str(Path(kimi_k2.__file__).parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
        proc = subprocess.run([sys.executable, "-m", "kimi_k2.engine.aot_decode", tmp], capture_output=True,
                              text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"building the AOTInductor decode package failed:\n{proc.stderr[-3000:]}")
        os.replace(Path(tmp) / "decode.pt2", path)  # atomic: a concurrent build of the same key writes the same graph
    return path, time.perf_counter() - start


class AotDecoder:
    """Decode steps of `model` over `pool` through the AOTInductor package of its shape."""

    def __init__(self, model: nn.Module, pool: LatentPool):
        check_decode_model(model)
        if pool.kv.dtype != torch.float32 or pool.device.type != "cpu":
            raise ValueError(f"the AOTInductor decode needs a float32 latent cache on the CPU, got {pool.kv.dtype} "
                             f"on {pool.device}")
        self.model, self.pool = model, pool
        prepare_decode_layout(model)
        kernels.load()  # the custom ops' CPU kernels, which the package calls by name
        self.job: dict[str, Any] = {}
        self.runner: Any = None  # torch._C._aoti.AOTIModelPackageLoader
        self.build_seconds: float | None = None  # the subprocess build of `warm_up`; None: a cache hit
        self._watched = WatchedWeights(model)
        self._flat: list[torch.Tensor] = []

    def _weights(self) -> list[torch.Tensor]:
        """The tensors of `decode_weights(model)` (`WatchedWeights`), checked on every rebuild against the structure
        the package was built for (a mismatch would read memory with the wrong strides)."""
        weights, rebuilt = self._watched.current()
        if rebuilt and describe(weights) != self.job["weights"]:
            raise RuntimeError("the model's decode weights changed dtype, shape or layout since the AOTInductor "
                               "package was built; start a new engine")
        if rebuilt or not self._flat:
            self._flat = [t for t in pytree.tree_flatten(weights)[0] if t is not None]  # the runner's inputs: tensors
        return self._flat

    def warm_up(self) -> None:
        """Load the package of this model's shape (built in a subprocess on a cache miss) and run one step."""
        self.job = {"config": self.model.config.to_dict(), "page_size": self.pool.page_size,
                    "attention_factor": self.model.model.rotary.attention_factor,
                    "weights": describe(self._watched.current()[0])}
        path, self.build_seconds = package(self.job)
        self.runner = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        with torch.inference_mode():
            self._run([Row([0], 0, [0], True)])
        if self.build_seconds is None:
            log.info("AOTInductor decode ready: %s (cached)", path.name)
        else:
            log.info("AOTInductor decode ready: %s built in %.1f s", path.name, self.build_seconds)

    def batched_ready(self) -> bool:
        """Always: one graph serves every batch size."""
        return True

    def wait_batched(self, timeout: float | None = None) -> bool:
        return True

    def _run(self, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """One token of each of B rows -> (logits [B, vocab], latents [L, B, C + R])."""
        pages = self.pool.page_ids(rows, min_pages=1)
        tokens = torch.tensor([r.input_ids[0] for r in rows])
        positions = torch.tensor([r.num_computed_tokens for r in rows])
        logits, latents = self.runner.boxed_run([*self._weights(), tokens, positions, pages, self.pool.kv])
        return logits, latents

    def __call__(self, rows: list[Row]) -> torch.Tensor:
        """Compute each row's one token and store its latents -> fp32 logits [rows with `last`, vocab]."""
        return self.pool.store_decoded(rows, *self._run(rows))


if __name__ == "__main__":  # the builder subprocess: python -m kimi_k2.engine.aot_decode DIR (DIR/job.json)
    build_package(json.loads((Path(sys.argv[1]) / "job.json").read_text()), Path(sys.argv[1]) / "decode.pt2")
