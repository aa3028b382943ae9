"""One system under test in its own process, driven by run.py over stdin/stdout (one JSON object per line).

    python worker.py kimi  --model DIR --threads T --mode '{"dtype": "float32", ...}' --max-seqs S --max-len L
    python worker.py llama --gguf FILE --threads T --kv f32|f16 --flash-attn on|off|auto --yarn-beta FAST SLOW ...

(`llama` runs in $PEERS/llama-venv with LLAMA_CPP_LIB_PATH set: llama-cpp-python's ctypes binding over the libllama.so
built by setup.sh; `kimi` runs in the project's python.) Requests:
    {"op": "generate", "prompts": [[ids]...], "new": N}  -> {"tokens": [[ids]...], "cpu": s, "wall": s}
    {"op": "logits", "ids": [...], "start": P, "out": PATH} -> logits of positions start-1 .. len-2 saved as .npy
    {"op": "stats"} -> {"peak_rss_mib": ...};  {"op": "wait"} -> {} once background compiles are done;  {"op": "quit"}
Greedy, no EOS: every stream gets exactly N tokens. `cpu` is the process's CPU time (all its threads) over the call.
A separate process per system keeps thread pools, allocators and peak RSS apart; run.py interleaves their calls.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any


class KimiWorker:
    """Our LLMEngine; `mode` = keyword arguments: dtype, and any of load_model's / EngineConfig's (`compile_decode`,
    `quantization`, ...), split by name, so a new precision mode is one entry in run.py's KIMI_MODES."""

    def __init__(self, model: str, threads: int, mode: dict[str, Any], max_seqs: int, max_len: int) -> None:
        import inspect

        import torch

        from kimi_k2.engine import EngineConfig, LLMEngine
        from kimi_k2.engine.loader import load_model

        torch.set_num_threads(threads)
        mode = dict(mode)
        dtype = getattr(torch, mode.pop("dtype", "float32"))
        engine_keys = set(inspect.signature(EngineConfig).parameters)
        engine_kw = {k: mode.pop(k) for k in list(mode) if k in engine_keys}
        self.model = load_model(model, dtype, **mode)
        pages = -(-max_len // 16) * max_seqs
        config = EngineConfig(page_size=16, num_pages=pages, max_model_len=max_len, max_num_seqs=max_seqs,
                              max_num_batched_tokens=max(2048, max_len), enable_prefix_caching=False, **engine_kw)
        self.engine = LLMEngine(self.model, config=config)
        self.torch = torch

    def generate(self, prompts: list[list[int]], new: int) -> list[list[int]]:
        from kimi_k2.engine import SamplingParams

        res = self.engine.generate(prompts, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
        return [r[0].token_ids for r in res]

    def wait(self) -> None:
        """Until the compiled decode's batched graph, compiled in the background from the first batch on, is ready
        (or failed: batches then run the eager model)."""
        if self.engine.runner.decoder is not None:
            self.engine.runner.decoder.wait_batched()

    def logits(self, ids: list[int], start: int):
        with self.torch.no_grad():
            out = self.model(self.torch.tensor([ids]))[0, start - 1: len(ids) - 1]
        return out.float().numpy()


class LlamaWorker:
    """llama.cpp through its C API (llama-cpp-python's ctypes layer): batched greedy decode, one sequence id per
    stream, as llama-batched-bench / llama-server's slots do."""

    def __init__(self, gguf: str, threads: int, kv: str, flash_attn: str, yarn_beta: tuple[float, float],
                 max_seqs: int, max_len: int) -> None:
        import numpy as np
        from llama_cpp import llama_cpp as L

        self.L, self.np = L, np
        L.llama_backend_init()
        L.llama_log_set(_quiet_log, None)
        mp = L.llama_model_default_params()
        mp.progress_callback = _no_progress  # not the loader's dots on stderr
        self.model = L.llama_model_load_from_file(gguf.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        cp = L.llama_context_default_params()
        cp.n_ctx = max_seqs * max_len
        cp.n_batch = cp.n_ctx
        cp.n_seq_max = max_seqs
        cp.n_threads = cp.n_threads_batch = threads
        # one KV stream per sequence, each n_ctx / n_seq_max cells (llama-batched-bench's default): a unified cache
        # makes every stream attend over all streams' cells (masked), which made 32 streams slower than 8 here
        cp.kv_unified = False
        cp.no_perf = True
        cp.type_k = cp.type_v = {"f32": L.GGML_TYPE_F32, "f16": L.GGML_TYPE_F16}[kv]
        cp.flash_attn_type = {"off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                              "auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO}[flash_attn]
        # llama.cpp's deepseek2 loader ignores the GGUF's yarn_beta_* keys (uses 32/1); K2 says 1/1
        cp.yarn_beta_fast, cp.yarn_beta_slow = yarn_beta
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(cp.n_batch, 0, max_seqs)

    def _fill(self, entries: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        for i, (token, pos, seq, want) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, want
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _row(self, i: int):
        return self.np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))

    def generate(self, prompts: list[list[int]], new: int) -> list[list[int]]:
        self.L.llama_memory_clear(self.mem, True)
        entries, last = [], []
        for s, p in enumerate(prompts):
            entries += [(t, j, s, j == len(p) - 1) for j, t in enumerate(p)]
            last.append(len(entries) - 1)
        self._fill(entries)
        out = [[int(self._row(i).argmax())] for i in last]
        for step in range(1, new):
            self._fill([(o[-1], len(p) + step - 1, s, True) for s, (p, o) in enumerate(zip(prompts, out, strict=True))])
            for s, o in enumerate(out):
                o.append(int(self._row(s).argmax()))
        return out

    def logits(self, ids: list[int], start: int):
        self.L.llama_memory_clear(self.mem, True)
        self._fill([(t, j, 0, j >= start - 1) for j, t in enumerate(ids[:-1])])
        return self.np.stack([self._row(j).copy() for j in range(start - 1, len(ids) - 1)])


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet_log(level: int, text: bytes, user_data: object) -> None:
    if level >= 4:  # GGML_LOG_LEVEL_ERROR
        sys.stderr.write(text.decode(errors="replace"))


@ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_float, ctypes.c_void_p)
def _no_progress(progress: float, user_data: object) -> bool:
    return True


def peak_rss_mib() -> float:
    """VmHWM of this process (getrusage's ru_maxrss would carry the parent's peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def serve(worker: Any) -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "generate":
                wall, cpu = time.perf_counter(), time.process_time()
                tokens = worker.generate(req["prompts"], req["new"])
                reply = {"tokens": tokens, "cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}
            elif req["op"] == "logits":
                import numpy as np

                np.save(req["out"], worker.logits(req["ids"], req["start"]))
                reply = {"out": req["out"]}
            elif req["op"] == "stats":
                reply = {"peak_rss_mib": peak_rss_mib()}
            elif req["op"] == "wait":
                getattr(worker, "wait", lambda: None)()
                reply = {}
            elif req["op"] == "quit":
                return
            else:
                reply = {"error": f"unknown op {req['op']!r}"}
        except Exception as e:  # reported to run.py, which records the row as failed
            reply = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)}
        print(json.dumps(reply), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("system", choices=["kimi", "llama"])
    ap.add_argument("--model")
    ap.add_argument("--gguf")
    ap.add_argument("--mode", default="{}", help="kimi: JSON keyword arguments (dtype, compile_decode, ...)")
    ap.add_argument("--kv", default="f32", choices=["f32", "f16"])
    ap.add_argument("--flash-attn", default="off", choices=["off", "on", "auto"])
    ap.add_argument("--yarn-beta", nargs=2, type=float, default=(32.0, 1.0))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-seqs", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=256)
    args = ap.parse_args()
    try:
        if args.system == "kimi":
            worker: Any = KimiWorker(args.model, args.threads, json.loads(args.mode), args.max_seqs, args.max_len)
        else:
            worker = LlamaWorker(args.gguf, args.threads, args.kv, args.flash_attn, tuple(args.yarn_beta),
                                 args.max_seqs, args.max_len)
    except Exception as e:
        print(json.dumps({"ready": False, "error": f"{type(e).__name__}: {e}"}), flush=True)
        raise SystemExit(1) from e
    serve(worker)


if __name__ == "__main__":
    main()
