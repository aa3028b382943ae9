"""Streaming detokenization that never emits a broken UTF-8 sequence."""

from __future__ import annotations

import codecs

from kimi_k2.tokenizer.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """push(token_id) -> the text completed by this token. A byte-level BPE token can end inside a multi-byte
    character; those bytes are held back until the character is complete. Bytes that can never form valid UTF-8
    become U+FFFD, as in `Tokenizer.decode`, so the pushes joined with flush() equal decode(all ids)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        tok = self.tokenizer
        if self.skip_special_tokens and token_id in tok.skippable_ids:
            return ""
        return self._utf8.decode(tok.id_to_token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character becomes U+FFFD); the detokenizer starts afresh."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
