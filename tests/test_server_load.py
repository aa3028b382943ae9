"""64 concurrent streaming clients against a real server: zero errors, every stream complete, nothing left running."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from server_fixtures import API_KEY, MODEL, ServerThread, make_model_dir, make_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_server_load import run_load  # noqa: E402


def test_64_concurrent_streams(k2_tokenizer_dir, tmp_path):
    state = make_state(make_model_dir(k2_tokenizer_dir, tmp_path / "model"))
    with ServerThread(state) as url:
        stats = asyncio.run(run_load(url, MODEL, clients=64, requests=64, max_tokens=6, api_key=API_KEY))
        assert stats["errors"] == 0, stats["first_errors"]
        assert stats["requests_per_s"] > 0 and stats["tokens_per_s"] > 0
        engine = state.engine.stats()
        assert (engine["running"], engine["waiting"], engine["pages_used"]) == (0, 0, 0)
    assert state.metrics.requests[("/v1/chat/completions", 200)] == 64
    assert 0 < state.metrics.generation_tokens == stats["completion_tokens"] <= 64 * 6
