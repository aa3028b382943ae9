"""The Kimi K2 pre-tokenization pattern and the layout of the 256 special-token slots after the base tokens.

Source: `tokenization_kimi.py` (`TikTokenTokenizer`) and `tokenizer_config.json` of Kimi-K2-Instruct
(shared/reference/kimi_k2_formats.md §2, §2.1).
"""

from __future__ import annotations

NUM_RESERVED_SPECIAL_TOKENS = 256

# `pat_str` of tokenization_kimi.py: 8 alternatives joined by "|". `&&[^\p{Han}]` is a character-class
# intersection (supported by tiktoken's fancy-regex, Oniguruma in `tokenizers`, and `regex` with the V1 flag).
PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# offset k inside the special block -> (content, special). Real K2: id = 163584 + k. Tool-call markers are
# `special: false` (HF `skip_special_tokens` keeps them). Every other slot is `<|reserved_token_{id}|>`.
K2_SPECIAL_OFFSETS: dict[int, tuple[str, bool]] = {
    0: ("[BOS]", True),
    1: ("[EOS]", True),
    2: ("<|im_end|>", True),
    3: ("<|im_user|>", True),
    4: ("<|im_assistant|>", True),
    6: ("<|start_header_id|>", True),
    7: ("<|end_header_id|>", True),
    9: ("[EOT]", True),
    10: ("<|im_system|>", True),
    11: ("<|tool_calls_section_begin|>", False),
    12: ("<|tool_calls_section_end|>", False),
    13: ("<|tool_call_begin|>", False),
    14: ("<|tool_call_argument_begin|>", False),
    15: ("<|tool_call_end|>", False),
    17: ("<|im_middle|>", True),
    254: ("[UNK]", True),
    255: ("[PAD]", True),
}

# Kimi-K2-Thinking adds the media markers and the reasoning delimiters (ids 163602..163607; kimi_k2_formats.md §2.1).
# <think> and </think> are kept `special: false` here, like the tool-call markers, so that skip_special_tokens keeps
# them in the text the reasoning parser splits.
THINK_BEGIN, THINK_END = "<think>", "</think>"
K2_THINKING_SPECIAL_OFFSETS: dict[int, tuple[str, bool]] = {
    **K2_SPECIAL_OFFSETS,
    18: ("<|media_begin|>", True),
    19: ("<|media_content|>", True),
    20: ("<|media_end|>", True),
    21: ("<|media_pad|>", True),
    22: (THINK_BEGIN, False),
    23: (THINK_END, False),
}


def reserved_name(token_id: int) -> str:
    return f"<|reserved_token_{token_id}|>"


def added_tokens_decoder(num_base_tokens: int, names: dict[int, tuple[str, bool]] | None = None) -> dict[str, dict]:
    """The `added_tokens_decoder` of tokenizer_config.json for `num_base_tokens` base tokens: `names` (offset ->
    (content, special); default the K2 names) at their offsets, `<|reserved_token_{id}|>` elsewhere."""
    names = K2_SPECIAL_OFFSETS if names is None else names
    out = {}
    for k in range(NUM_RESERVED_SPECIAL_TOKENS):
        i = num_base_tokens + k
        content, special = names.get(k, (reserved_name(i), True))
        out[str(i)] = {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False, "special": special}
    return out
