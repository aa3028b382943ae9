import os

# One intra-op thread in the test process and, through the environment, in every process it starts (a variable set by
# the caller wins). The tests check results, not speed; on the loaded 2-core box OpenMP workers spinning while a
# sibling is descheduled cost several times the CPU of the work itself (in-process engine and server tests at load ~8:
# 164 s of CPU with torch's default threads, 33 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case a plugin imported torch before this file

if not torch.cuda.is_available():
    # The Triton kernels' CPU tests run them interpreted, and triton picks interpreter or compiler when triton.language
    # is first imported, which torch.compile's dynamic-shape graphs may do before those tests: choose it up front.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def k2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory):
    """A Kimi-format tokenizer directory (1024 base tokens + 256 specials, built-in chat_template.jinja) trained
    in well under a second on the stdlib's English docs; load it with `kimi_k2.tokenizer.Tokenizer.from_pretrained`."""
    import sysconfig
    from pathlib import Path

    from kimi_k2.tokenizer.trainer import train_tokenizer

    out = tmp_path_factory.mktemp("k2_tokenizer")
    train_tokenizer([Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"], 1024, out)
    return out


@pytest.fixture(scope="module")
def server(k2_tokenizer_dir, tmp_path_factory: pytest.TempPathFactory):
    """(base URL, ServerState) of a real uvicorn server on loopback over a random k2-tiny model, one per test module."""
    from server_fixtures import ServerThread, make_model_dir, make_state

    state = make_state(make_model_dir(k2_tokenizer_dir, tmp_path_factory.mktemp("model")))
    with ServerThread(state) as url:
        yield url, state
