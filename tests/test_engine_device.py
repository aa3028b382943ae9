"""The engine's device: `--device` resolution, and every tensor a step makes lives where the model is.

The check runs the engine's steps under `torch.device("meta")` as the default device: a tensor made without an
explicit device (an input, a cache index, a sampling parameter, a penalty count) lands on meta and the step fails or
its tokens differ, while tensors made on the engine's device are unaffected. On this CPU-only box the engine's device
is the CPU; on a GPU the same code puts everything on CUDA.
"""

import pytest
import torch

from kimi_k2.cli import main
from kimi_k2.config import K2Config
from kimi_k2.engine import EngineConfig, LLMEngine
from kimi_k2.engine.device import resolve_device
from kimi_k2.engine.params import SamplingParams
from kimi_k2.model import K2ForCausalLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return K2ForCausalLM.from_config(K2Config.from_preset("k2-tiny"), dtype=torch.float32).eval()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device(None) == resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="cpu or cuda"):
        resolve_device("meta")


PARAMS = [SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
          SamplingParams(max_tokens=5, temperature=0.8, top_k=20, top_p=0.9, seed=3, ignore_eos=True),
          SamplingParams(max_tokens=5, temperature=1.0, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.5,
                         seed=4, logprobs=2, ignore_eos=True)]
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [5] * 12]


def run(engine, default_device=None):
    ids = [engine.add_request(p, s) for p, s in zip(PROMPTS, PARAMS, strict=True)]
    out = {i: [] for i in ids}
    with torch.device(default_device) if default_device else torch.inference_mode():
        while engine.has_unfinished():
            for d in engine.step():
                out[d.request_id] += d.token_ids
    return [out[i] for i in ids]


def test_every_step_tensor_is_made_on_the_engine_device(model):
    config = EngineConfig(num_pages=32, page_size=4, max_model_len=64)
    engine = LLMEngine(model, config=config)
    assert engine.device == engine.pool.device == torch.device("cpu")
    want = run(engine)
    assert all(len(t) == 5 for t in want)
    engine = LLMEngine(model, config=config)
    assert run(engine, "meta") == want  # nothing of a step was made on the default device


def test_sequences_sample_with_generators_on_the_engine_device(model):
    engine = LLMEngine(model, config=EngineConfig(num_pages=16, page_size=4, max_model_len=32))
    rid = engine.add_request([1, 2, 3], SamplingParams(n=2, seed=1))
    assert all(s.generator.device == engine.device for s in engine.requests[rid].seqs)


def test_cli_device_flag(capsys):
    args = ["generate", "k2-tiny", "--ids", "1 2 3", "--max-tokens", "3", "--temperature", "0", "--ignore-eos",
            "--no-compile", "--device"]
    assert main(args + ["cpu"]) == 0
    ok = capsys.readouterr()
    assert len(ok.out.split()) == 3, ok.err
    if not torch.cuda.is_available():
        assert main(args + ["cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
