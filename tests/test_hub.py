"""Hugging Face Hub repo ids as MODEL: resolved through a Hub cache laid out as huggingface_hub lays it out (built
here in a temporary HF_HOME, HF_HUB_OFFLINE=1), and downloaded from a local stand-in for the Hub's HTTP API, which
records that only the files a model needs are fetched. No test reaches the internet."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from server_fixtures import free_port
from thinking_fixtures import make_thinking_dir

from kimi_k2.checkpoint import hub

REPO = "moonshotai/Kimi-K2-Thinking"
EXTRA = {"modeling_deepseek.py": b"raise SystemExit('remote code must never run')\n",
         "figures/banner.png": b"\x89PNG fake", "docs/deploy_guidance.md": b"# deploy\n"}


@pytest.fixture(scope="module")
def model_dir(k2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_thinking_dir(k2_tokenizer_dir, tmp_path_factory.mktemp("hub") / "K2-Thinking-tiny")


def repo_files(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in model_dir.iterdir()} | EXTRA


def write_cache(hub_cache: Path, repo: str, commit: str, files: dict[str, bytes], ref: str | None = "main") -> Path:
    """The layout huggingface_hub keeps: models--ORG--NAME/{blobs/<etag>, snapshots/<commit>/<file> -> blob,
    refs/<branch> holding the commit}."""
    root = hub_cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snapshot


def test_repo_ids_and_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hub.is_repo_id(REPO) and hub.is_repo_id("org/name.v2")
    assert not hub.is_repo_id("k2-tiny") and not hub.is_repo_id("/abs/path") and not hub.is_repo_id("a/b/c")
    assert not hub.is_repo_id("../x")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not hub.is_repo_id("org/name")  # a local directory always wins


def test_offline_cache_resolves_main_and_a_revision(model_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    main_commit, old_commit = "a" * 40, "b" * 40
    snap = write_cache(cache, REPO, main_commit, repo_files(model_dir))
    write_cache(cache, REPO, old_commit, {"config.json": b"{}"}, ref="v1")
    assert hub.resolve(REPO, cache_dir=cache) == snap
    assert (hub.resolve(REPO, cache_dir=cache) / "config.json").read_bytes() == (model_dir / "config.json").read_bytes()
    assert hub.resolve(REPO, revision="v1", cache_dir=cache).name == old_commit
    assert hub.resolve(REPO, revision=old_commit, cache_dir=cache).name == old_commit
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE is set and the Hub cache does not hold it"):
        hub.resolve("moonshotai/Kimi-K2-Instruct", cache_dir=cache)
    with pytest.raises(hub.HubError, match="v9"):
        hub.resolve(REPO, revision="v9", cache_dir=cache)


def test_cli_inspects_a_cached_repo_offline(model_dir: Path, tmp_path: Path) -> None:
    write_cache(tmp_path / "home" / "hub", REPO, "c" * 40, repo_files(model_dir))
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    run = [sys.executable, "-m", "kimi_k2.cli"]
    info = subprocess.run([*run, "info", REPO], env=env, capture_output=True, text=True, timeout=120)
    assert info.returncode == 0 and "INT4 experts" in info.stdout, info.stderr
    missing = subprocess.run([*run, "info", "moonshotai/Kimi-K2-Instruct"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 1 and "HF_HUB_OFFLINE" in missing.stderr


class FakeHub:
    """Just enough of the Hub's HTTP API for snapshot_download: repo info at a revision, and file HEAD/GET."""

    def __init__(self, files: dict[str, bytes], commit: str):
        self.files, self.commit, self.fetched = files, commit, []
        app = FastAPI()

        @app.get("/api/models/{org}/{name}/revision/{revision}")
        async def info(org: str, name: str, revision: str) -> dict:
            return {"id": f"{org}/{name}", "sha": self.commit, "siblings": [{"rfilename": f} for f in self.files]}

        @app.api_route("/{org}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
        async def resolve(org: str, name: str, revision: str, path: str, request: Request) -> Response:
            data = self.files.get(path)
            if data is None:
                return Response(status_code=404, headers={"X-Error-Code": "EntryNotFound"})
            headers = {"X-Repo-Commit": self.commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Content-Length": str(len(data))}
            if request.method == "HEAD":
                return Response(headers=headers)
            self.fetched.append(path)
            return Response(content=data, headers=headers, media_type="application/octet-stream")

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
        self.url = f"http://127.0.0.1:{self.server.config.port}"

    def __enter__(self) -> FakeHub:
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def test_download_fetches_only_the_model_files(model_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once, when first imported
    files = repo_files(model_dir)
    with FakeHub(files, "d" * 40) as fake:
        path = hub.resolve(REPO, revision="main", cache_dir=tmp_path / "hub", endpoint=fake.url)
    wanted = {n for n in files if n not in EXTRA}
    assert set(fake.fetched) == wanted
    assert {p.name for p in path.iterdir()} == wanted and path.name == "d" * 40
    # now cached: offline resolution finds the same snapshot
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve(REPO, cache_dir=tmp_path / "hub") == path
