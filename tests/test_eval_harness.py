"""`kimi-k2 eval` against a real OpenAI-shaped HTTP server on loopback with scripted policies.

Policies (chosen by the request's `model`):
- perfect: reads the task from the conversation and plays the reference episode (right calls, reference answers);
- erring: perfect on even-numbered tasks; on odd ones it never calls a tool and answers "I don't know.";
- badjson: the right tools in the right rounds, but every argument string is broken JSON; reference answers;
- anything else: HTTP 400.
"""

import json
import socket
import threading
import time
from statistics import mean

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from kimi_k2.cli import main
from kimi_k2.eval.benchmarks import load_tasks
from kimi_k2.eval.runner import METRICS

PER_KIND = 2
K = 2


def pick(name: str) -> list[dict]:
    """PER_KIND tasks of each kind, kinds interleaved, so that task parity splits every kind evenly."""
    _, tasks = load_tasks(name)
    kinds = list(dict.fromkeys(t["kind"] for t in tasks))
    return [[t for t in tasks if t["kind"] == k][i] for i in range(PER_KIND) for k in kinds]


def reply(policy: str, index: int, task: dict, messages: list[dict]) -> dict:
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    turn = task["turns"][len(users) - 1]
    step = sum(m["role"] == "assistant" for m in messages[users[-1]:])
    n = sum(len(m.get("tool_calls") or []) for m in messages)
    wrong = policy == "erring" and index % 2 == 1
    if not wrong and step < len(turn["calls"]):
        calls = [{"id": f"functions.{c['name']}:{n + i}", "type": "function",
                  "function": {"name": c["name"],
                               "arguments": "{bad" if policy == "badjson" else json.dumps(c["arguments"])}}
                 for i, c in enumerate(turn["calls"][step])]
        return {"role": "assistant", "content": None, "tool_calls": calls}
    return {"role": "assistant", "content": "I don't know." if wrong else turn["answer"]}


def make_app(tasks: dict[str, tuple[int, dict]], log: list[dict]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        log.append(body)
        if body["model"] not in ("perfect", "erring", "badjson"):
            return JSONResponse({"error": {"message": f"unknown model {body['model']}"}}, status_code=400)
        msgs = body["messages"]
        index, task = tasks[msgs[1]["content"]]
        message = reply(body["model"], index, task, msgs)
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "message": message,
                             "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    return app


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for var in ("NO_PROXY", "no_proxy"):  # loopback must never go through an HTTP proxy from the environment
        monkeypatch.setenv(var, "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    chosen = {"tool_use": pick("tool_use"), "chat": pick("chat")}
    for name, tasks in chosen.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    return root, chosen


@pytest.fixture(scope="module")
def server(bench):
    _, chosen = bench
    tasks = {t["turns"][0]["user"]: (i, t) for ts in chosen.values() for i, t in enumerate(ts)}
    log: list[dict] = []
    srv = uvicorn.Server(uvicorn.Config(make_app(tasks, log), log_level="warning"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", log
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


def run_eval(server, bench, tmp_path, model: str) -> tuple[int, dict, dict]:
    url, log = server
    root, _ = bench
    log.clear()
    paths = ",".join(str(root / f"{n}.jsonl") for n in ("tool_use", "chat"))
    rc = main(["eval", "--base-url", url, "--api-key", "test", "--model", model, "--tasks", paths, "-k", str(K),
               "--concurrency", "4", "--out", str(tmp_path)])
    summaries = {n: json.loads((tmp_path / f"{n}.summary.json").read_text()) for n in ("tool_use", "chat")}
    records = {n: [json.loads(x) for x in (tmp_path / f"{n}.results.jsonl").read_text().splitlines()]
               for n in ("tool_use", "chat")}
    return rc, summaries, records


def test_perfect_policy_scores_100(server, bench, tmp_path):
    rc, summaries, records = run_eval(server, bench, tmp_path, "perfect")
    _, chosen = bench
    assert rc == 0
    for name, summary in summaries.items():
        assert set(summary) == {"all"} | {t["kind"] for t in chosen[name]}
        for group in summary.values():
            assert group["errors"] == 0 and group["k"] == K
            assert [group[m] for m in METRICS] == [1.0] * len(METRICS)
        assert [(r["task_id"], r["sample"]) for r in records[name]] == [
            (t["id"], s) for t in chosen[name] for s in range(K)]
    # one request per assistant message of the reference episodes, all at the model cards' temperature
    _, log = server
    expected = K * sum(len(turn["calls"]) + 1 for ts in chosen.values() for t in ts for turn in t["turns"])
    assert len(log) == expected
    assert {body["temperature"] for body in log} == {0.6}
    # tool results went back to the model with the ids of its calls
    for body in log:
        ids = [c["id"] for m in body["messages"] for c in m.get("tool_calls") or []]
        assert [m["tool_call_id"] for m in body["messages"] if m["role"] == "tool"] == ids


def test_erring_policy_scores_half(server, bench, tmp_path):
    rc, summaries, _ = run_eval(server, bench, tmp_path, "erring")
    _, chosen = bench
    assert rc == 0
    for name, tasks in chosen.items():
        summary = summaries[name]
        assert summary["all"]["avg@k"] == summary["all"]["pass^k"] == 0.5
        assert all(s["avg@k"] == 0.5 for s in summary.values())  # every kind has one right and one wrong task
        # odd tasks get the tool name right exactly on the turns that need no tool
        want = mean(1.0 if i % 2 == 0 else mean(not turn["calls"] for turn in t["turns"])
                    for i, t in enumerate(tasks))
        assert summary["all"]["tool_name"] == pytest.approx(want)
        assert summary["all"]["args_valid"] == 1.0  # every call it made was valid
        # Tau2-style end state: odd tasks leave the environment untouched
        want = mean(1.0 if i % 2 == 0 or not t["final_state"] else 0.0 for i, t in enumerate(tasks))
        assert summary["all"]["state_ok"] == pytest.approx(want)
    assert summaries["tool_use"]["multi_turn"]["state_ok"] == 0.5


def test_broken_json_arguments(server, bench, tmp_path):
    rc, summaries, _ = run_eval(server, bench, tmp_path, "badjson")
    _, chosen = bench
    tool = summaries["tool_use"]
    assert tool["all"]["tool_name"] == 1.0
    with_calls = [any(turn["calls"] for turn in t["turns"]) for t in chosen["tool_use"]]
    assert tool["all"]["args_valid"] == pytest.approx(mean(0.0 if c else 1.0 for c in with_calls))
    assert tool["all"]["avg@k"] == pytest.approx(mean(0.0 if c else 1.0 for c in with_calls))
    assert tool["refusal"]["avg@k"] == 1.0 and tool["single"]["avg@k"] == 0.0
    assert summaries["chat"]["all"]["avg@k"] == 1.0


def test_api_errors_are_recorded(server, bench, tmp_path, capsys):
    rc, summaries, records = run_eval(server, bench, tmp_path, "no-such-model")
    assert rc == 1  # every episode failed: the CLI's runtime-error exit, with the first error named
    n = K * sum(len(ts) for ts in bench[1].values())
    assert f"kimi-k2 eval: error: every one of the {n} episodes ended in an API error, the first: BadRequestError" \
        in capsys.readouterr().err
    assert all(r["error"] and "400" in r["error"] and not r["success"] for rs in records.values() for r in rs)
    assert summaries["chat"]["all"]["errors"] == K * len(bench[1]["chat"])


def test_bad_benchmarks_are_named(tmp_path):
    with pytest.raises(ValueError, match="no benchmark 'mmlu'.*tool_use"):
        load_tasks("mmlu")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl holds no tasks"):
        load_tasks(str(tmp_path / "empty.jsonl"))
    (tmp_path / "old.jsonl").write_text(json.dumps({"id": "x", "kind": "single", "turns": []}) + "\n")
    with pytest.raises(ValueError, match="task x lacks \\['final_state', 'system', 'tools'\\]"):
        load_tasks(str(tmp_path / "old.jsonl"))
    with pytest.raises(ValueError, match="limit"):
        load_tasks("chat", limit=0)
    (tmp_path / "bad.jsonl").write_text('{"id": "x"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not a JSON task"):
        load_tasks(str(tmp_path / "bad.jsonl"))
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="task 1 is not a JSON object"):
        load_tasks(str(tmp_path / "list.jsonl"))
    assert [t["id"] for t in load_tasks("chat", limit=3)[1]] == ["chat-0000", "chat-0001", "chat-0002"]
