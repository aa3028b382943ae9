"""Hugging Face Hub repo ids as models (`kimi-k2 serve moonshotai/Kimi-K2-Instruct`), resolved with `huggingface_hub`.

A MODEL that is not a local path but reads as `org/name` is a Hub repo: its snapshot at `revision` comes from the
Hub cache (HF_HOME / HF_HUB_CACHE, or `cache_dir`), downloading only the files a model needs (config, weights and
their index, the tiktoken tokenizer files, the chat template) unless HF_HUB_OFFLINE is set, in which case the cache
alone must hold them. Private repos take the usual HF_TOKEN.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# what loading a Kimi-format model reads; remote code (tokenization_kimi.py, modeling_deepseek.py) is never run here
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tiktoken.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
CONFIG_FILES = ["config.json"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class HubError(OSError):
    """A repo id that could not be resolved: not cached (offline), not found, or not downloadable."""


def is_repo_id(model: str) -> bool:
    """`org/name`, and no such local path (a local directory always wins)."""
    return _REPO_ID.fullmatch(model) is not None and ".." not in model and not Path(model).exists()


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def resolve(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
            files: list[str] = MODEL_FILES, endpoint: str | None = None) -> Path:
    """The local snapshot directory of `repo_id` at `revision` (default: main) holding `files` (glob patterns);
    `endpoint`: the Hub's URL (default: HF_ENDPOINT, else huggingface.co)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}{'@' + revision if revision else ''}"
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=files,
                                 local_files_only=offline(), endpoint=endpoint)
    except (LocalEntryNotFoundError, FileNotFoundError) as e:
        hint = "HF_HUB_OFFLINE is set and the Hub cache does not hold it" if offline() else \
            "it is not in the Hub cache and could not be downloaded"
        raise HubError(f"Hugging Face model {where}: {hint} (cache: {cache_dir or 'HF_HOME'}): {e}") from None
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as e:
        raise HubError(f"Hugging Face model {where} not found: {e}") from None
    except OSError as e:  # network errors (requests' ConnectionError is an OSError)
        raise HubError(f"Hugging Face model {where} could not be downloaded: {e}") from None
    return Path(path)
