"""Expert offload: routed experts stay memory-mapped in the fp8 checkpoint and are dequantized per use."""

import json
import struct
import warnings

import pytest
import torch

from kimi_k2.checkpoint import CheckpointError, CheckpointReader, save_state_dict
from kimi_k2.config import K2Config
from kimi_k2.deploy.offload import MappedShard, OffloadedExpert, load_offloaded
from kimi_k2.engine import EngineConfig, LLMEngine, SamplingParams
from kimi_k2.model import K2ForCausalLM
from kimi_k2.parallel import CachedStepper, greedy_generate

# experts dominate the bytes, as in K2 (97%): 64 experts of 3 x 128x256 per MoE layer
CONFIG = K2Config.from_preset("k2-tiny").replace(hidden_size=128, moe_intermediate_size=256, n_routed_experts=64,
                                                   num_experts_per_tok=4)


def param_bytes(model: torch.nn.Module) -> int:
    return sum(t.nbytes for t in model.state_dict().values())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = K2ForCausalLM.from_config(CONFIG)
    out = tmp_path_factory.mktemp("offload") / "fp8"
    model.save_pretrained(out, fp8=True, max_shard_size=1 << 20)
    return out


@pytest.fixture(scope="module")
def dense(checkpoint):
    return K2ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)


# no cache (the default) in the default run: [5] and test_offloaded_model_serves_through_the_engine
@pytest.mark.parametrize("cache_experts", [pytest.param(0, marks=pytest.mark.slow), 5])
def test_offloaded_logits_equal_the_loaded_fp8_model(checkpoint, dense, cache_experts):
    model = load_offloaded(checkpoint, dtype=torch.float32, cache_experts=cache_experts)
    ids = torch.randint(0, CONFIG.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), dense(ids), rtol=0, atol=1e-5)
    prompts = ids[:, :4].tolist()
    want = greedy_generate(CachedStepper(dense, 12), prompts, 6)
    got = greedy_generate(CachedStepper(model, 12), prompts, 6)
    assert got[0] == want[0]
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-5)
    store = model.model.layers[1].mlp.experts[0].store
    assert len(store.lru) == min(cache_experts, store.dequantized)


def test_experts_are_not_resident(checkpoint, dense):
    model = load_offloaded(checkpoint, dtype=torch.float32)
    reader = CheckpointReader(checkpoint)
    expert_names = [n for n in reader.weight_map if ".mlp.experts." in n]
    expert_bytes = sum(reader.info[n][0].itemsize * torch.Size(reader.info[n][1]).numel() for n in expert_names)
    assert not any(".mlp.experts." in n for n in model.state_dict())
    experts = [m for m in model.modules() if isinstance(m, OffloadedExpert)]
    assert len(experts) == 2 * CONFIG.n_routed_experts and not any(p for e in experts for p in e.parameters())
    dense_expert_bytes = sum(t.nbytes for n, t in dense.state_dict().items() if ".mlp.experts." in n)
    assert param_bytes(model) == param_bytes(dense) - dense_expert_bytes
    assert param_bytes(model) < expert_bytes / 4  # what stays in RAM is far below the fp8 expert bytes on disk


def mapped_rss(shards: list[MappedShard]) -> int:
    """Resident bytes of these shards' mappings in this process (Linux /proc/self/smaps)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        starts = {torch.frombuffer(s.mm, dtype=torch.uint8).data_ptr() for s in shards}
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line: start-end perms offset dev inode path
            inside = int(fields[0].split("-")[0], 16) in starts
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def test_used_expert_pages_are_released(checkpoint):
    ids = torch.randint(0, CONFIG.vocab_size, (4, 16), generator=torch.Generator().manual_seed(2))
    rss = {}
    for release in (False, True):
        model = load_offloaded(checkpoint, dtype=torch.float32, release_pages=release)
        with torch.no_grad():
            model(ids)
        store = model.model.layers[1].mlp.experts[0].store
        assert store.dequantized > CONFIG.n_routed_experts  # most experts were used
        rss[release] = mapped_rss(list(store.shards.values()))
    assert rss[False] > 0
    assert rss[True] < rss[False] / 4


def test_offloaded_model_serves_through_the_engine(checkpoint, dense):
    params = SamplingParams(max_tokens=5, temperature=0.0)
    prompts = [[3, 14, 15, 92], [6, 5, 35]]
    want = LLMEngine(dense, config=EngineConfig()).generate(prompts, params)
    got = LLMEngine(load_offloaded(checkpoint, dtype=torch.float32), config=EngineConfig()).generate(prompts, params)
    assert [r[0].token_ids for r in got] == [r[0].token_ids for r in want]


def test_missing_or_misshapen_expert_is_a_clear_error(tmp_path, dense):
    state = dense.state_dict()
    gone = "model.layers.2.mlp.experts.7.up_proj.weight"
    save_state_dict({k: v for k, v in state.items() if k != gone}, tmp_path / "missing", CONFIG, fp8=True)
    with pytest.raises(CheckpointError, match=gone.replace(".", r"\.")):
        load_offloaded(tmp_path / "missing")
    bad = "model.layers.1.mlp.experts.3.down_proj.weight"
    state = {**state, bad: state[bad][:, :128]}
    save_state_dict(state, tmp_path / "shape", CONFIG, fp8=True)
    with pytest.raises(CheckpointError, match=f"shape mismatch for {bad}".replace(".", r"\.")):
        load_offloaded(tmp_path / "shape")


def test_mapped_shard_rejects_a_corrupt_header(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(CheckpointError, match="tensor w lies outside"):
        MappedShard(tmp_path / "bad.safetensors")
    (tmp_path / "short.safetensors").write_bytes(struct.pack("<Q", 1 << 40))
    with pytest.raises(CheckpointError, match="header length"):
        MappedShard(tmp_path / "short.safetensors")


def test_unquantized_checkpoints_offload_too(tmp_path, dense):
    dense.save_pretrained(tmp_path / "fp32")
    model = load_offloaded(tmp_path / "fp32", dtype=torch.float32)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), dense(ids), rtol=0, atol=1e-5)
