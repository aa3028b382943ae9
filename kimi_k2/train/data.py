"""Training data: packed fixed-length rows of tokens plus a loss mask, and a seeded, stateless batch order.

Pretraining: every document is tokenized, followed by EOS, and the documents are concatenated into one stream that
is cut into rows of seq_len + 1 tokens (inputs row[:-1], targets row[1:]); the trailing partial row is dropped.
SFT: each conversation is rendered with the chat template (`Tokenizer.encode_chat_for_training`); only the
assistant's tokens (content, tool calls, closing <|im_end|>) are targets. Whole conversations are packed greedily
into rows, never split; the rest of a row is padding that is never a target.

The batch of step t is a pure function of (seed, t, rank), so the data position of a run is its step count.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

IGNORE_INDEX = -100


class ChatTokenizer(Protocol):
    eos_id: int
    pad_id: int

    def encode(self, text: str, **kwargs: Any) -> list[int]: ...

    def encode_chat_for_training(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> tuple[list[int], list[bool]]: ...


@dataclass
class PackedRows:
    tokens: torch.Tensor  # [N, S+1] int64
    loss_mask: torch.Tensor  # [N, S+1] bool: token t is a target (only positions 1..S are ever used)

    def __post_init__(self) -> None:
        if self.tokens.shape != self.loss_mask.shape or self.tokens.dim() != 2:
            raise ValueError(f"tokens {tuple(self.tokens.shape)} and loss_mask {tuple(self.loss_mask.shape)} differ")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def split(self, val_fraction: float, seed: int) -> tuple[PackedRows, PackedRows]:
        """Seeded row split into (train, validation)."""
        n_val = round(len(self) * val_fraction)
        if val_fraction > 0 and (n_val == 0 or n_val == len(self)):
            raise ValueError(f"val_fraction {val_fraction} leaves an empty split of {len(self)} rows")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        val, train = perm[:n_val].sort().values, perm[n_val:].sort().values
        return self.select(train), self.select(val)

    def select(self, idx: torch.Tensor) -> PackedRows:
        return PackedRows(self.tokens[idx], self.loss_mask[idx])

    def inputs_and_labels(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `idx` as (input_ids [B, S], labels [B, S]) with IGNORE_INDEX where no loss is taken."""
        rows, mask = self.tokens[idx], self.loss_mask[idx]
        labels = rows[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
        return rows[:, :-1].contiguous(), labels.contiguous()


def pack_stream(documents: Iterable[Sequence[int]], seq_len: int, eos_id: int) -> PackedRows:
    """Concatenate documents, each followed by EOS, and cut the stream into rows of seq_len + 1 tokens."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    stream: list[int] = []
    for doc in documents:
        stream.extend(doc)
        stream.append(eos_id)
    return pack_token_array(np.asarray(stream, dtype=np.int64), seq_len)


def pack_token_array(stream: np.ndarray, seq_len: int) -> PackedRows:
    """Rows of seq_len + 1 tokens from an already tokenized stream (documents already separated)."""
    n = len(stream) // (seq_len + 1)
    if n == 0:
        raise ValueError(f"{len(stream)} tokens are fewer than one row of seq_len + 1 = {seq_len + 1}")
    tokens = torch.from_numpy(np.ascontiguousarray(stream[: n * (seq_len + 1)], dtype=np.int64)).view(n, seq_len + 1)
    return PackedRows(tokens, torch.ones_like(tokens, dtype=torch.bool))


def pack_conversations(
    examples: Iterable[tuple[Sequence[int], Sequence[bool]]], seq_len: int, pad_id: int
) -> tuple[PackedRows, int]:
    """Greedy in-order packing of (ids, assistant_mask) examples into rows of seq_len + 1 tokens.

    A conversation longer than a row is truncated (its tail dropped). Returns the rows and the truncation count.
    """
    width = seq_len + 1
    rows: list[list[int]] = []
    masks: list[list[bool]] = []
    cur_ids: list[int] = []
    cur_mask: list[bool] = []
    truncated = 0
    for ids, mask in examples:
        if len(ids) != len(mask):
            raise ValueError(f"conversation has {len(ids)} tokens but a mask of {len(mask)}")
        if len(ids) > width:
            ids, mask, truncated = ids[:width], mask[:width], truncated + 1
        if len(cur_ids) + len(ids) > width:
            rows.append(cur_ids)
            masks.append(cur_mask)
            cur_ids, cur_mask = [], []
        cur_ids.extend(ids)
        cur_mask.extend(bool(m) for m in mask)
    if cur_ids:
        rows.append(cur_ids)
        masks.append(cur_mask)
    if not rows:
        raise ValueError("no conversations to pack")
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        loss_mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return PackedRows(tokens, loss_mask), truncated


def read_documents(paths: Sequence[Path]) -> list[str]:
    """Text documents: a `.txt` file is one document; a `.jsonl` file has one {"text": ...} object per line."""
    docs: list[str] = []
    for path in paths:
        if path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    obj = json.loads(line)
                    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                        raise ValueError(f"{path}:{n}: expected a JSON object with a string 'text' field")
                    docs.append(obj["text"])
        elif path.suffix == ".txt":
            docs.append(path.read_text(encoding="utf-8"))
        else:
            raise ValueError(f"pretraining file {path} must be .txt, .jsonl (text) or .npy (token ids)")
    return docs


def read_conversations(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """OpenAI-format chat examples, one {"messages": [...], "tools": [...]?} JSON object per line."""
    out: list[dict[str, Any]] = []
    for path in paths:
        if path.suffix != ".jsonl":
            raise ValueError(f"SFT file {path} must be .jsonl with one {{'messages': [...]}} object per line")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
                    raise ValueError(f"{path}:{n}: expected a JSON object with a 'messages' list")
                out.append(obj)
    return out


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given; a directory contributes its files in sorted order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"data path {p} does not exist")
    if not out:
        raise ValueError(f"data paths {[str(p) for p in paths]} contain no files")
    return out


def load_pretrain(paths: Sequence[Path], seq_len: int, tokenizer: ChatTokenizer | None) -> PackedRows:
    npy = [p for p in paths if p.suffix == ".npy"]
    if npy and len(npy) != len(paths):
        raise ValueError("pretraining paths mix .npy token files with text files; use one kind")
    if npy:
        return pack_token_array(np.concatenate([np.load(p).astype(np.int64).ravel() for p in npy]), seq_len)
    if tokenizer is None:
        raise ValueError("text pretraining data needs [data] tokenizer = DIR")
    # raw text: special-token strings in it stay text, never become control tokens
    docs = read_documents(paths)
    return pack_stream((tokenizer.encode(d, allow_special=False) for d in docs), seq_len, tokenizer.eos_id)


_worker_tokenizer: Any = None


def _load_worker_tokenizer(directory: str) -> None:
    global _worker_tokenizer
    from kimi_k2.tokenizer import Tokenizer

    _worker_tokenizer = Tokenizer.from_pretrained(directory)


def _encode_chunk(convs: list[dict[str, Any]]) -> list[tuple[list[int], list[bool]]]:
    return [_worker_tokenizer.encode_chat_for_training(c["messages"], c.get("tools")) for c in convs]


def load_sft(
    paths: Sequence[Path], seq_len: int, tokenizer: ChatTokenizer, workers: int = 1, tokenizer_dir: str | None = None
) -> tuple[PackedRows, int]:
    """Tokenize and pack the conversations; with workers > 1 (and the tokenizer's directory) in that many processes,
    in order, so the rows are the same as with one."""
    convs = read_conversations(paths)
    if workers > 1 and tokenizer_dir is not None:
        size = max(1, -(-len(convs) // (workers * 8)))
        chunks = [convs[i : i + size] for i in range(0, len(convs), size)]
        ctx = multiprocessing.get_context("spawn")  # no fork after torch/CUDA started threads
        with ProcessPoolExecutor(workers, ctx, _load_worker_tokenizer, (tokenizer_dir,)) as pool:
            examples = [e for chunk in pool.map(_encode_chunk, chunks) for e in chunk]
    else:
        examples = (tokenizer.encode_chat_for_training(c["messages"], c.get("tools")) for c in convs)
    return pack_conversations(examples, seq_len, tokenizer.pad_id)


@dataclass(frozen=True)
class BatchOrder:
    """Seeded order over rows: sample g of the run is row perm_{g // N}[g % N], a fresh permutation per epoch.

    Step t's global batch is samples [t * G, (t + 1) * G) with G = micro_batch * grad_accum * world_size;
    micro-batch m of rank r is the slice at offset (m * world_size + r) * micro_batch.
    """

    num_rows: int
    micro_batch: int
    grad_accum: int
    world_size: int = 1
    seed: int = 0

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def rows(self, step: int, micro: int, rank: int) -> torch.Tensor:
        if not (0 <= micro < self.grad_accum and 0 <= rank < self.world_size):
            raise ValueError(f"micro {micro} / rank {rank} out of range ({self.grad_accum}, {self.world_size})")
        start = step * self.global_batch + (micro * self.world_size + rank) * self.micro_batch
        g = torch.arange(start, start + self.micro_batch)
        epochs = g // self.num_rows
        out = torch.empty_like(g)
        for e in epochs.unique().tolist():
            perm = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + e))
            sel = epochs == e
            out[sel] = perm[g[sel] % self.num_rows]
        return out
