"""The trainer end to end on k2-tiny: the real CLI in subprocesses (deterministic, 1 thread) and in-process steps."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kimi_k2.checkpoint import ShardWriter
from kimi_k2.model import K2ForCausalLM
from kimi_k2.train.checkpointing import read_model_state
from kimi_k2.train.plot import plot_runs
from kimi_k2.train.recipe import Recipe
from kimi_k2.train.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny.toml"


def make_tokens(path: Path, n_docs: int = 200, seed: int = 0) -> Path:
    """Arithmetic-progression documents (learnable) over the k2-tiny vocab, EOS (1) between them."""
    rng = np.random.default_rng(seed)
    stream: list[int] = []
    for _ in range(n_docs):
        start, length = int(rng.integers(2, 512)), int(rng.integers(10, 60))
        stream += [(start + 3 * i) % 510 + 2 for i in range(length)] + [1]
    np.save(path, np.asarray(stream, dtype=np.int32))
    return path


def cli(out: Path, tokens: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kimi_k2.cli", "train", "--config", str(TINY), "--out", str(out),
            "--set", f"data.paths=[{json.dumps(str(tokens))}]", *extra]


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def logged_steps(run: Path) -> int:
    """The last training step a running job has logged (complete lines only: the file may be mid-write)."""
    path = run / "log.jsonl"
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines()[: text.count("\n")]
    return max((json.loads(line).get("step", 0) for line in lines), default=0)


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return read_model_state(sorted((run / "checkpoints").iterdir())[-1])


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return make_tokens(tmp_path_factory.mktemp("data") / "tokens.npy")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tokens) -> Path:
    out = tmp_path_factory.mktemp("runs") / "full"
    run_cli(cli(out, tokens))
    return out


def test_smoke_recipe_learns_logs_and_exports(full_run, tokens):
    log = read_log(full_run)
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5
    assert all(len(r["max_logit"]) == 3 and len(r["expert_maxvio"]) == 2 for r in steps)
    assert all(r["qk_clip_heads_clipped"] == [0, 0, 0] for r in steps)  # tau = 100 is far above these logits
    assert any("val_loss" in r for r in log)
    # the HF-layout export holds the final weights
    model = K2ForCausalLM.from_pretrained(full_run / "final", dtype=torch.float32)
    ref = final_weights(full_run)
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref[name]), name
    assert len(plot_runs([full_run], full_run / "plots")) >= 5
    # running a finished run again changes nothing (no duplicate log lines, same weights)
    assert "resumed from" in run_cli(cli(full_run, tokens)).stdout
    assert read_log(full_run) == log
    assert all(torch.equal(t, ref[name]) for name, t in final_weights(full_run).items())


def test_sigkill_at_random_step_then_resume_is_bitwise_identical(tmp_path, tokens, full_run):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cli(out, tokens), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "checkpoints" / "step_00000004"
    kill_after = random.randint(4, 10)  # a random step after the first checkpoint, before the last step (12)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if first.exists() and logged_steps(out) >= kill_after:
            break
        time.sleep(0.002)
    assert first.exists(), "no checkpoint appeared before the run ended"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(r["step"] for r in read_log(out))
    assert killed_at < 12

    proc = run_cli(cli(out, tokens))
    assert "resumed from" in proc.stdout
    ref, got = final_weights(full_run), final_weights(out)
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    def drop_speed(log: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log]

    assert drop_speed(read_log(out)) == drop_speed(read_log(full_run))  # the redone steps replaced the killed ones


def recipe(tokens: Path, out: Path, *overrides: str) -> Recipe:
    return Recipe.from_toml(TINY, [f"data.paths=[{json.dumps(str(tokens))}]", f"train.out_dir={json.dumps(str(out))}",
                                   "train.threads=0", "train.deterministic=false", *overrides])


def test_a_rerun_after_a_kill_before_the_first_checkpoint_logs_each_step_once(tmp_path, tokens):
    out = tmp_path / "early"
    r = recipe(tokens, out, "schedule.total_steps=4", "train.ckpt_every=0", "train.export=false")
    t = Trainer(r)
    real_step = t.train_step

    def dies_in_step_3(step: int, track_logits: bool):
        if step == 2:
            raise KeyboardInterrupt  # the process ends here: steps 1-2 logged, no checkpoint written yet
        return real_step(step, track_logits)

    t.train_step = dies_in_step_3
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert [r["step"] for r in read_log(out)] == [1, 2] and not list((out / "checkpoints").glob("step_*"))
    Trainer(r).fit()
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1, 2, 3, 4]


def test_a_rerun_cleans_up_after_a_kill_during_export(tmp_path, tokens):
    """SIGKILL skips every cleanup: what it leaves mid-export (the writer's temp folder, the previous export moved
    aside) and mid-save (a checkpoint temp folder) is removed, or put back, by the next run of the same out_dir."""
    out = tmp_path / "export"
    r = recipe(tokens, out, "schedule.total_steps=2", "train.ckpt_every=1", "train.keep_last=3")
    Trainer(r).fit()
    os.replace(out / "final", out / ".final.old-0123abcd")  # killed between the two renames that publish
    partial = ShardWriter(out / "final")  # ... while a new export was being written
    (partial.tmp / "shard-00000.tmp").write_bytes(b"partial")
    (out / "checkpoints" / ".tmp_step_00000003").mkdir()  # and a checkpoint save of a longer run
    Trainer(r).fit()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    ref = final_weights(out)
    exported = K2ForCausalLM.from_pretrained(out / "final", dtype=torch.float32).state_dict()
    assert exported.keys() == ref.keys() and all(torch.equal(t, ref[n]) for n, t in exported.items())


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tokens):
    a = Trainer(recipe(tokens, tmp_path / "a", "optim.name='adamw'", "train.micro_batch=4", "train.grad_accum=2"))
    b = Trainer(recipe(tokens, tmp_path / "b", "optim.name='adamw'", "train.micro_batch=8", "train.grad_accum=1"))
    b.model.load_state_dict(a.model.state_dict())
    for t in (a, b):  # plain SGD: the parameter change is the gradient itself (Adam's first step is ~sign(g))
        t.optimizer = torch.optim.SGD(t.model.parameters(), lr=1.0)
    sa, sb = a.train_step(0, track_logits=True), b.train_step(0, track_logits=True)
    assert sa.tokens == sb.tokens == 8 * 32
    assert sa.loss == pytest.approx(sb.loss, rel=1e-5)
    assert sa.grad_norm == pytest.approx(sb.grad_norm, rel=1e-4)
    assert torch.equal(sa.expert_load, sb.expert_load)
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_router_bias_moves_toward_balance(tmp_path, tokens):
    t = Trainer(recipe(tokens, tmp_path / "r", "train.moe_bias_update_speed=0.01"))
    stats = t.train_step(0, track_logits=False)
    k = t.config.num_experts_per_tok
    # every token of every micro-batch is routed to k experts in every MoE layer
    assert stats.expert_load.sum(dim=1).tolist() == [8 * 32 * k] * len(t.moe)
    load = stats.expert_load
    for j, mlp in enumerate(t.moe):
        expect = 0.01 * torch.sign(load[j].mean() - load[j])
        assert torch.equal(mlp.gate.e_score_correction_bias, expect)
        # overloaded experts lose bias, underloaded ones gain it
        assert (mlp.gate.e_score_correction_bias[load[j] > load[j].mean()] < 0).all()


CONVERSATION = {
    "messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "It is sunny and 21 C in Paris."},
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
}


def test_sft_trains_only_on_assistant_tokens(tmp_path, k2_tokenizer_dir):
    from kimi_k2.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(k2_tokenizer_dir)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(CONVERSATION) + "\n" for _ in range(6)))
    r = Recipe.from_toml(TINY, [
        f"data.paths=[{json.dumps(str(data))}]", "data.kind='sft'",
        f"data.tokenizer={json.dumps(str(k2_tokenizer_dir))}", "data.seq_len=511",
        "data.val_fraction=0.0", f"model.overrides={{vocab_size = {tok.n_vocab}}}",
        f"train.out_dir={json.dumps(str(tmp_path / 'run'))}", "train.threads=0", "train.deterministic=false",
        "train.micro_batch=2", "train.grad_accum=1",
    ])
    t = Trainer(r)
    x, y = t.train_rows.inputs_and_labels(torch.arange(len(t.train_rows)))
    targets = tok.decode(y[y != -100].tolist())
    assert "It is sunny and 21 C in Paris.<|im_end|>" in targets
    assert "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Paris\"}" in targets
    assert "weather in Paris?" not in targets and "sunny, 21 C<" not in targets  # user and tool turns are context
    ids, mask = tok.encode_chat_for_training(CONVERSATION["messages"], CONVERSATION["tools"])
    assert not mask[0] and int((y != -100).sum()) == sum(mask) * 6  # every assistant token of every copy
    first, second = t.train_step(0, track_logits=True), t.train_step(1, track_logits=True)
    assert first.tokens == int((t.train_rows.inputs_and_labels(t.order.rows(0, 0, 0))[1] != -100).sum())
    assert np.isfinite(first.loss) and np.isfinite(second.loss)


def test_bfloat16_autocast_step_tracks_fp32(tmp_path, tokens):
    f32 = Trainer(recipe(tokens, tmp_path / "f", "optim.name='adamw'"))
    bf16 = Trainer(recipe(tokens, tmp_path / "b", "optim.name='adamw'", "train.dtype='bfloat16'"))
    bf16.model.load_state_dict(f32.model.state_dict())
    a, b = f32.train_step(0, track_logits=True), bf16.train_step(0, track_logits=True)
    assert next(bf16.model.parameters()).dtype == torch.float32  # master weights stay fp32
    assert b.loss != a.loss and b.loss == pytest.approx(a.loss, rel=2e-2)


def test_fp8_export_loads_and_matches_the_trained_weights(tmp_path, tokens):
    t = Trainer(recipe(tokens, tmp_path / "e", "train.export_fp8=true"))
    t.train_step(0, track_logits=True)
    final = t.export()
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "fp8"
    loaded = K2ForCausalLM.from_pretrained(final, dtype=torch.float32).state_dict()
    quantized = 0
    for name, w in t.model.state_dict().items():
        if torch.equal(loaded[name], w):  # embeddings, head, norms, router, bias: stored as is
            continue
        # block FP8 (e4m3, 3 mantissa bits): each weight within 2^-4 of its 128x128 block's amax, <= the tensor's amax
        assert name.endswith("_proj.weight") or name.endswith("kv_a_proj_with_mqa.weight"), name
        assert (loaded[name] - w).abs().max() <= w.abs().max() * 2**-4, name
        quantized += 1
    assert quantized > 0


def test_tensorboard_logs_the_same_scalars_as_the_jsonl(tmp_path, tokens):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    Trainer(recipe(tokens, out, "train.tensorboard=true", "schedule.total_steps=4", "train.log_every=1")).fit()
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [r for r in read_log(out) if "loss" in r]
    got = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [s for s, _ in got] == [r["step"] for r in logged]
    assert [v for _, v in got] == pytest.approx([r["loss"] for r in logged], rel=1e-6)


@pytest.mark.parametrize("optim", ["muonclip", "adamw"])
def test_frozen_parameters_stay_as_loaded(tmp_path, tokens, optim):
    t = Trainer(recipe(tokens, tmp_path / "f", f"optim.name='{optim}'", "train.freeze=['embed_tokens', 'lm_head']"))
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    for step in range(2):
        t.train_step(step, track_logits=False)
    after = dict(t.model.named_parameters())
    frozen = {n for n in before if "embed_tokens" in n or "lm_head" in n}
    assert frozen == {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(torch.equal(before[n], after[n]) for n in frozen)  # no update, no weight decay
    assert not torch.equal(before["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"],
                           after["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"])


def test_a_freeze_pattern_that_matches_nothing_is_an_error(tmp_path, tokens):
    with pytest.raises(ValueError, match=r"\[train\] freeze: 'lm_haed' matches no parameter"):
        Trainer(recipe(tokens, tmp_path / "f", "train.freeze=['lm_haed']"))
