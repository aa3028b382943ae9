"""Smoke run of benchmarks/bench_abuse.py on a real server: well-behaved streaming clients next to abusive ones
(huge bodies, provably too long prompts, long or many stop strings, unsatisfiable schemas, streams aborted midway).
Every well-behaved request completes, every abusive one gets its named error (or is served), no 5xx, nothing left in
the engine. Latency is the benchmark's business, not this test's."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from server_fixtures import ServerThread, make_model_dir, make_state

from kimi_k2.server.state import ServerLimits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_abuse import KEY, abuse_report, abusers, good_clients  # noqa: E402


def test_abuse_smoke(k2_tokenizer_dir, tmp_path):
    state = make_state(make_model_dir(k2_tokenizer_dir, tmp_path / "model"), api_key=KEY,
                       limits=ServerLimits(max_request_bytes=1 << 20))
    with ServerThread(state) as url:
        async def both():
            return await asyncio.gather(good_clients(url, "kimi-k2-test", 8, 6, 4.0),
                                        abusers(url, "kimi-k2-test", 4, 4.0, 2 << 20, 512 << 10))

        good, abuse = asyncio.run(both())
        kinds = abuse_report(abuse)
        assert good["errors"] == [] and good["requests"] >= 8 and good["itl"]
        assert len(kinds) >= 8, kinds  # the abusers got through most kinds
        assert {k: v["problems"] for k, v in kinds.items() if v["problems"]} == {}
        assert all(s < 500 for k in kinds.values() for s in k["statuses"])
        for _ in range(200):
            engine = state.engine.stats()
            if (engine["running"], engine["waiting"], engine["pages_used"]) == (0, 0, 0):
                break
            asyncio.run(asyncio.sleep(0.05))
        assert (engine["running"], engine["waiting"], engine["pages_used"]) == (0, 0, 0)
    assert not [k for k in state.metrics.requests if k[1] >= 500]
