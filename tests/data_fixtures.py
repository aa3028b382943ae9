"""Checks shared by the tests of the train-data generators (generic.py, broad.py)."""

from __future__ import annotations

import json
import re

from kimi_k2.data import synthetic


def heldout_words_in(train: list[synthetic.Episode], heldout: list[synthetic.Episode]) -> list[str]:
    """The held-out string values of 4+ letters (cities, items, element names...) that occur as whole words anywhere
    in the train episodes' conversations, lower-cased."""
    text = " ".join(json.dumps(e.conversation()) for e in train).lower()
    words = {json.loads(v) for e in heldout for v in synthetic.footprint(e)["values"] if v.startswith('"')}
    words = {w for w in words if len(w) >= 4}
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b")
    return sorted(set(pattern.findall(text)))
