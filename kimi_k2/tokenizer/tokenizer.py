"""Kimi K2 tokenizer: tiktoken BPE over `tiktoken.model`, 256 special slots after the base tokens, chat template.

Directory format (the Hugging Face Kimi-K2 repos, shared/reference/kimi_k2_formats.md §2): `tiktoken.model` (one
`base64(token bytes) rank` per line, ranks 0..N-1), `tokenizer_config.json` (`added_tokens_decoder`: id -> content
for the special ids N..N+255), optional `chat_template.jinja` (else the built-in K2-Instruct-0905 template).

Special-token text inside message content (e.g. a user typing "<|im_end|>"): the original tokenizer encodes the
whole rendered prompt with every special token allowed, so such text becomes a real special token and can forge
turns (prompt injection, also through tool results fetched from the web). Here chat tokenization is SAFE by
default (`special_in_content=False`): only the template's own markers become special tokens, text that came from
the messages/tools is encoded as plain text. Pass `special_in_content=True` (per call or on the Tokenizer) for the
original behaviour. Plain `encode(text)` follows the original (`allow_special=True`): raw prompts are trusted.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import tiktoken

from kimi_k2.tokenizer.chat_template import (
    Marker,
    builtin_template,
    compile_template,
    normalize_messages,
    render_pieces,
)
from kimi_k2.tokenizer.specials import NUM_RESERVED_SPECIAL_TOKENS, PAT_STR, added_tokens_decoder, reserved_name

# tokenization_kimi.py: texts are cut into 400k-char chunks, and those into runs of at most 25k consecutive
# whitespace / non-whitespace chars, so tiktoken's regex never sees a pathological run.
_MAX_CHARS = 400_000
_MAX_RUN = 25_000


_LONG_RUN = re.compile(rf"\s{{{_MAX_RUN + 1},}}|\S{{{_MAX_RUN + 1},}}")


def _runs(s: str) -> Iterable[str]:
    start = 0
    for m in _LONG_RUN.finditer(s):
        for cut in range(m.start() + _MAX_RUN, m.end(), _MAX_RUN):
            yield s[start:cut]
            start = cut
    yield s[start:]


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:80]!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once (a token repeated or a rank missing)")
    return ranks


class Tokenizer:
    def __init__(self, mergeable_ranks: dict[bytes, int], special_names: dict[int, tuple[str, bool]] | None = None,
                 chat_template: str | None = None, special_in_content: bool = False, name: str = "kimi_k2"):
        """`special_names`: offset k in 0..255 -> (content, special flag), the unnamed slots being
        `<|reserved_token_{id}|>` (as tokenization_kimi.py does); None = the K2 names at the K2 offsets."""
        self.num_base_tokens = len(mergeable_ranks)
        n = self.num_base_tokens
        decoder = added_tokens_decoder(n, None if special_names is None else {})
        for k, (content, special) in (special_names or {}).items():
            if not 0 <= k < NUM_RESERVED_SPECIAL_TOKENS:
                raise ValueError(f"special token {content!r}: offset {k} outside 0..{NUM_RESERVED_SPECIAL_TOKENS - 1}")
            decoder[str(n + k)] = {**decoder[str(n + k)], "content": content, "special": special}
        self._decoder = decoder
        self.special_tokens: dict[str, int] = {v["content"]: int(i) for i, v in decoder.items()}
        if len(self.special_tokens) != NUM_RESERVED_SPECIAL_TOKENS:
            raise ValueError("special token names must be distinct")
        self.n_vocab = n + NUM_RESERVED_SPECIAL_TOKENS
        self.model = tiktoken.Encoding(name, pat_str=PAT_STR, mergeable_ranks=mergeable_ranks,
                                       special_tokens=self.special_tokens, explicit_n_vocab=self.n_vocab)
        self._id_to_special = {i: s for s, i in self.special_tokens.items()}
        self.skippable_ids = {int(i) for i, v in decoder.items() if v["special"]}
        self._special_re = re.compile("|".join(re.escape(s) for s in sorted(self.special_tokens, key=len,
                                                                                reverse=True)))
        self.chat_template = chat_template if chat_template is not None else builtin_template()
        compile_template(self.chat_template)  # a broken template fails here, at load, not in a client's request
        self.special_in_content = special_in_content
        self.bos_id = self.token_to_id("[BOS]")
        self.eos_id = self.token_to_id("[EOS]")
        self.im_end_id = self.token_to_id("<|im_end|>")
        self.pad_id = self.token_to_id("[PAD]")
        self.stop_token_ids = [self.eos_id, self.im_end_id]

    # ---- files -----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], **kwargs: Any) -> Tokenizer:
        d = Path(directory)
        model_file = d / "tiktoken.model"
        if not model_file.is_file():
            raise FileNotFoundError(f"no tiktoken.model in {d}")
        ranks = _read_ranks(model_file)
        n = len(ranks)
        config: dict[str, Any] = {}
        if (d / "tokenizer_config.json").is_file():
            try:
                config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{d / 'tokenizer_config.json'} is not valid JSON: {e}") from e
        names = None if "added_tokens_decoder" not in config else {}
        for i, entry in (config.get("added_tokens_decoder") or {}).items():
            if not i.isdigit() or not isinstance(entry, dict):
                raise ValueError(f"added_tokens_decoder entry {i!r}: expected an id -> {{'content': ...}} object")
            k = int(i) - n
            if not 0 <= k < NUM_RESERVED_SPECIAL_TOKENS:
                raise ValueError(f"added token {entry.get('content')!r} has id {i}, outside the special range "
                                 f"{n}..{n + NUM_RESERVED_SPECIAL_TOKENS - 1} of this {n}-token vocabulary")
            names[k] = (entry.get("content") or reserved_name(int(i)), bool(entry.get("special", True)))
        template, source = None, None
        if (d / "chat_template.jinja").is_file():
            template, source = (d / "chat_template.jinja").read_text(encoding="utf-8"), d / "chat_template.jinja"
        elif isinstance(config.get("chat_template"), str):
            template, source = config["chat_template"], d / "tokenizer_config.json"
        if template is not None:
            try:
                compile_template(template)
            except ValueError as e:  # name the file: the message alone would not say which one is broken
                raise ValueError(f"{source}: {e}") from e
        return cls(ranks, names, template, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        lines = [f"{base64.b64encode(self.model.decode_single_token_bytes(i)).decode()} {i}"
                 for i in range(self.num_base_tokens)]
        (d / "tiktoken.model").write_text("\n".join(lines) + "\n")
        config = {
            "added_tokens_decoder": self._decoder,
            "bos_token": "[BOS]",
            "eos_token": "[EOS]",
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "tokenizer_class": "TikTokenTokenizer",
        }
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (d / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        return d

    # ---- ids <-> text ----------------------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool | Iterable[str] = True) -> list[int]:
        """`allow_special`: True = every special-token text is a special token (the original's default), False =
        none is (encoded as plain text), or a set of the special-token strings to allow."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        if allow_special is True:
            allowed: set[str] | str = "all"
        elif allow_special is False:
            allowed = set()
        else:
            allowed = set(allow_special)
            unknown = allowed - self.special_tokens.keys()
            if unknown:
                raise ValueError(f"allow_special names unknown special tokens: {sorted(unknown)[:5]}")
        ids: list[int] = []
        for i in range(0, len(text), _MAX_CHARS):
            for run in _runs(text[i:i + _MAX_CHARS]):
                ids.extend(self.model.encode(run, allowed_special=allowed, disallowed_special=()))
        return ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool | Iterable[str] = True,
                     num_threads: int = 2) -> list[list[int]]:
        with ThreadPoolExecutor(num_threads) as pool:
            return list(pool.map(lambda t: self.encode(t, allow_special), texts))

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} outside the vocabulary 0..{self.n_vocab - 1}")
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """UTF-8 errors become U+FFFD. `skip_special_tokens` drops the `special: true` ids (not the tool-call
        markers, which K2 marks `special: false`, as in Hugging Face)."""
        ids = self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.skippable_ids]
        return self.model.decode(ids, errors="replace")

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        try:
            return self.model.encode_single_token(token.encode())
        except KeyError:
            raise KeyError(f"{token!r} is not a token of this vocabulary") from None

    def id_to_token_bytes(self, token_id: int) -> bytes:
        (token_id,) = self._check_ids([token_id])
        if token_id in self._id_to_special:
            return self._id_to_special[token_id].encode()
        return self.model.decode_single_token_bytes(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.num_base_tokens

    # ---- chat --------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                            add_generation_prompt: bool = True, tokenize: bool = False,
                            special_in_content: bool | None = None, **template_kwargs: Any) -> str | list[int]:
        """Render (and with `tokenize=True` encode) a conversation with this tokenizer's chat template."""
        pieces = self._render(normalize_messages(messages), tools, add_generation_prompt, template_kwargs)
        if not tokenize:
            return "".join(t for t, _ in pieces)
        return self._encode_pieces([(t, d, False) for t, d in pieces], special_in_content)[0]

    def encode_chat_for_training(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                                 special_in_content: bool | None = None,
                                 **template_kwargs: Any) -> tuple[list[int], list[bool]]:
        """Token ids of the whole conversation and a mask that is True on the tokens the assistant generated:
        each assistant turn's content, tool calls and closing <|im_end|>, not its header nor any prompt part.

        An assistant turn is located by rendering the conversation up to it (the template must render prefixes
        as prefixes); its header is what the generation prompt writes, or, when it differs (a `name`, or the
        default system prompt in front of a first message), everything up to the generation prompt's last marker.
        """
        msgs = normalize_messages(messages)
        pieces = self._render(msgs, tools, False, template_kwargs)
        full = "".join(t for t, _ in pieces)
        literal = _literal_spans(pieces, self._special_re)
        spans: list[tuple[int, int]] = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before, prompt, after = ("".join(t for t, _ in self._render(msgs[:n], tools, gen, template_kwargs))
                                     for n, gen in ((i, False), (i, True), (i + 1, False)))
            if not (prompt.startswith(before) and after.startswith(before) and full.startswith(after)):
                raise ValueError(f"chat template does not render messages[:{i}] as a prefix of the conversation; "
                                 "cannot locate assistant turns for the training mask")
            header = prompt[len(before):]
            turn = after[len(before):]
            if header and turn.startswith(header):
                start = len(prompt)
            else:
                start = self._header_end(header, literal, len(before), len(after), i)
            spans.append((start, len(after)))
        cut = sorted({p for s in spans for p in s})
        marked = []
        pos = 0
        for text, from_data in pieces:
            inner = [c - pos for c in cut if pos < c < pos + len(text)]
            for a, b in zip([0, *inner], [*inner, len(text)], strict=True):
                marked.append((text[a:b], from_data, any(s <= pos + a < e for s, e in spans)))
            pos += len(text)
        return self._encode_pieces(marked, special_in_content)

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, add_generation_prompt: bool,
                template_kwargs: dict[str, Any]) -> list[tuple[str, bool]]:
        # as Hugging Face, the special-token names are template variables (printed as markers, not as data)
        names = {f"{k}_token": Marker(v) for k, v in
                 (("bos", "[BOS]"), ("eos", "[EOS]"), ("unk", "[UNK]"), ("pad", "[PAD]")) if v in self.special_tokens}
        return render_pieces(self.chat_template, messages, tools, add_generation_prompt,
                                  **{**names, **template_kwargs})

    def _header_end(self, header: str, literal: list[tuple[int, int, str]], lo: int, hi: int, i: int) -> int:
        markers = self._special_re.findall(header)
        if not markers:
            raise ValueError(f"cannot find the header of assistant messages[{i}]: the generation prompt "
                             f"{header!r} has no special token")
        first = [s for s, _, tok in literal if lo <= s < hi and tok == markers[0]]
        last = [e for s, e, tok in literal if first and first[-1] <= s and e <= hi and tok == markers[-1]]
        if not last:
            raise ValueError(f"cannot find the header {header!r} of assistant messages[{i}] in its rendering")
        return last[0]

    def _encode_pieces(self, pieces: list[tuple[str, bool, bool]],
                       special_in_content: bool | None) -> tuple[list[int], list[bool]]:
        """Encode (text, from_data, mask) pieces. Adjacent plain text is encoded as one run, so the ids equal
        encoding the joined text, except that special-token text from data stays text unless allowed."""
        if special_in_content is None:
            special_in_content = self.special_in_content
        ids: list[int] = []
        mask: list[bool] = []
        run: list[str] = []
        run_mask = False

        def flush() -> None:
            if run:
                out = self.encode("".join(run), allow_special=False)
                ids.extend(out)
                mask.extend([run_mask] * len(out))
                run.clear()

        for text, from_data, m in pieces:
            if m != run_mask:
                flush()
                run_mask = m
            if from_data and not special_in_content:
                run.append(text)
                continue
            pos = 0
            for match in self._special_re.finditer(text):
                run.append(text[pos:match.start()])
                flush()
                ids.append(self.special_tokens[match.group()])
                mask.append(m)
                pos = match.end()
            run.append(text[pos:])
        flush()
        return ids, mask


def _literal_spans(pieces: list[tuple[str, bool]], special: re.Pattern[str]) -> list[tuple[int, int, str]]:
    """(start, end, token) of the special tokens the template itself wrote."""
    out = []
    pos = 0
    for text, from_data in pieces:
        if not from_data:
            out.extend((pos + m.start(), pos + m.end(), m.group()) for m in special.finditer(text))
        pos += len(text)
    return out
