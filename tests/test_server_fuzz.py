"""Property-based fuzzing of the served OpenAPI schema (schemathesis): no request, valid or not, gets a 5xx, every
answer conforms to the schema (documented status, content type, headers and body), and what the schema forbids is
refused. (Not checked: that every schema-valid request is served; a prompt longer than the context or a tool result
answering no tool call is valid JSON and still a 400.) The CLI run against `kimi-k2 serve` is in benchmarks/README.md.

The default run is a smoke (6 fuzzed examples per operation); `--run-slow` adds schemathesis' coverage phase (its
boundary and negative cases) and 150 examples per operation.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from server_fixtures import API_KEY, MODEL, ServerThread, make_model_dir, make_state

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(k2_tokenizer_dir, tmp_path_factory):
    # a short context bounds how long any fuzzed generation can run
    state = make_state(make_model_dir(k2_tokenizer_dir, tmp_path_factory.mktemp("model")), default_max_tokens=8,
                       max_model_len=160)
    with ServerThread(state) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(server):
    """The smoke: schemathesis' explicit-example and fuzzing phases (its coverage phase, every operation's boundary
    and negative cases, runs with the long test)."""
    api = schemathesis.openapi.from_url(server + "/openapi.json")
    api.config.phases.coverage.enabled = False
    return api


@pytest.fixture(scope="module")
def full_api_schema(server):
    return schemathesis.openapi.from_url(server + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")
full_schema = schemathesis.pytest.from_fixture("full_api_schema")
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]


def test_openapi_schema_lists_every_endpoint(server):
    paths = httpx.get(server + "/openapi.json").json()["paths"]
    for p in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/messages", "/v1/messages/count_tokens",
              "/health", "/metrics"):
        assert p in paths


@pytest.mark.parametrize("path, body, param", [
    ("/v1/messages", {"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "top_k": False}, "top_k"),
    ("/v1/completions", {"prompt": [[False]]}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "0.5"}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": 1}, "stream"),
])
def test_values_of_another_json_type_are_rejected(server, path, body, param):
    """What the schema forbids is refused (schemathesis' negative_data_rejection found `top_k: false` and the token
    prompt `[[false]]` served as 0): no bool for an int, no string for a number, no int for a bool."""
    r = httpx.post(server + path, json={"model": MODEL, **body}, headers=AUTH)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert message.startswith(param), message


@schema.parametrize()
@settings(max_examples=6, **SETTINGS)
def test_fuzz_no_server_errors(case):
    case.call_and_validate(headers=AUTH, checks=CHECKS, timeout=60)


@pytest.mark.slow
@full_schema.parametrize()
@settings(max_examples=150, **SETTINGS)
def test_fuzz_no_server_errors_long(case):
    case.call_and_validate(headers=AUTH, checks=CHECKS, timeout=60)
