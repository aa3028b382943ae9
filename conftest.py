"""Test-run options for tests/ and experiments/ alike.

--run-slow: also run the tests marked `slow`. Tests marked `gpu` are skipped without CUDA. --run-experiments: also
collect experiments/**/test_*.py (the tests of the studies under experiments/, marked `experiment`); a plain run
tests the product only.
"""

from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent / "experiments"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")
    parser.addoption("--run-experiments", action="store_true", help="also run the tests under experiments/")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.is_relative_to(EXPERIMENTS) and not config.getoption("--run-experiments"):
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    skip_gpu = None
    if any("gpu" in item.keywords for item in items):
        import torch

        if not torch.cuda.is_available():
            skip_gpu = pytest.mark.skip(reason="gpu: needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if skip_gpu is not None and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        if item.path.is_relative_to(EXPERIMENTS):
            item.add_marker(pytest.mark.experiment)
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip)
