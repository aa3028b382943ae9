import pytest

from kimi_k2.cli import main
from kimi_k2.config import K2Config
from kimi_k2.deploy.plan import GiB, component_bytes, make_plan, smallest_unit
from kimi_k2.model.info import kv_bytes_per_token, model_info

K2 = K2Config.from_preset("kimi-k2-instruct")


def test_fp8_weight_bytes_match_the_published_checkpoint_size():
    # shared/reference/kimi_k2_formats.md §1.5: 61 shards, 958.51 (GiB, as du prints) on disk
    total = sum(component_bytes(K2, fp8=True).values())
    assert total / GiB == pytest.approx(958.51, abs=0.5)
    bf16 = sum(component_bytes(K2, fp8=False).values())
    assert bf16 / total == pytest.approx(2.0, abs=0.05)


def test_latent_cache_is_576_values_per_layer():
    assert kv_bytes_per_token(K2) == (512 + 64) * 61 * 2 == 70272


@pytest.mark.parametrize("gpu", ["H200", "H20"])
def test_sixteen_gpus_is_the_smallest_fp8_unit_at_128k(gpu):
    # deploy_guidance.md: "The smallest unit for FP8 weights at 128k on H200/H20 is 16 GPUs, using TP or DP+EP"
    plan = smallest_unit(K2, gpu, 131072)
    assert plan is not None and plan.n_gpus == 16
    names = {lay.name for lay in plan.layouts if lay.fits}
    assert "TP=16" in names
    # On H200 both layouts of the guidance fit; on H20 (96 GB) replicated attention + embeddings leave DP+EP
    # 6.6 GB per rank, less than one 128K sequence's 9.2 GB latent cache: TP is the 16-GPU layout there.
    assert ("DP=16 attention + EP=16" in names) == (gpu == "H200")
    assert not make_plan(K2, gpu, 8, 131072).fits


def test_data_parallel_attention_holds_more_sequences_than_tp():
    plan = make_plan(K2, "H200", 16, 131072, concurrency=64)
    by_name = {lay.name: lay for lay in plan.layouts}
    assert by_name["DP=16 attention + EP=16"].max_seqs > by_name["TP=16"].max_seqs
    assert by_name["DP=16 attention + EP=16"].fits and not by_name["TP=16"].fits


def test_bad_input_is_named(capsys):
    with pytest.raises(ValueError, match="unknown GPU"):
        make_plan(K2, "Z80", 16, 4096)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        make_plan(K2, "H200", 16, 10**7)
    assert main(["plan", "--gpus", "sixteen"]) == 2  # a usage error
    assert "kimi-k2 plan: error:" in (err := capsys.readouterr().err) and "16xH200" in err
    assert main(["plan", "k2-small"]) == 1  # a runtime error: the default context is longer than k2-small's
    assert "kimi-k2 plan: error:" in (err := capsys.readouterr().err) and "max_position_embeddings" in err


def test_cli_prints_the_arithmetic(capsys):
    assert main(["plan", "kimi-k2-instruct", "--gpus", "16xH200", "--context", "131072"]) == 0
    out = capsys.readouterr().out
    assert "70,272 B/token" in out and "TP=16" in out and "FITS" in out
    assert main(["plan", "--model", "kimi-k2-instruct", "--gpus", "16xH200", "--context", "131072"]) == 0
    assert capsys.readouterr().out == out
    assert main(["plan", "--gpus", "8xH200"]) == 1  # prints the plan; no layout fits
    assert "no: weights alone exceed" in capsys.readouterr().out
    assert main(["plan", "--gpus", "16xH200", "--weights", "bf16"]) == 1
    assert "weights bf16" in capsys.readouterr().out


def test_plan_prints_the_serve_command_of_its_layout(capsys):
    assert main(["plan", "kimi-k2-instruct", "--gpus", "16xH200", "--context", "131072"]) == 0
    out = capsys.readouterr().out
    assert ("torchrun --nnodes 2 --node-rank $NODE_RANK --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint "
            "$HEAD_NODE:29500 -m kimi_k2.cli serve kimi-k2-instruct --tensor-parallel-size 16 --enable-expert-parallel "
            "--max-model-len 131072") in out
    assert main(["plan", "k2-small", "--gpus", "1xH200", "--context", "4096"]) == 0
    assert "kimi-k2 serve k2-small --max-model-len 4096 --max-num-seqs 256 --gpu-memory-utilization 0.9" in \
        capsys.readouterr().out
    assert main(["plan", "k2-small", "--gpus", "2xRTX4090", "--context", "4096", "--gpu-memory-utilization", "0.5"]) \
        == 0
    assert "torchrun --nproc-per-node 2 -m kimi_k2.cli serve k2-small --tensor-parallel-size 2 " \
        "--enable-expert-parallel --max-model-len 4096" in (out := capsys.readouterr().out)
    assert "--gpu-memory-utilization 0.5" in out
    assert main(["plan", "--gpus", "8xH200"]) == 1
    assert "serve it with" not in capsys.readouterr().out


def test_plan_counts_the_same_bytes_as_info():
    info = model_info(K2)
    assert sum(component_bytes(K2, fp8=True).values()) == info.fp8_bytes
    assert sum(component_bytes(K2, fp8=False).values()) == info.bf16_bytes
