"""The JSON-schema workload the structured-output benches share (bench/structured.py on the engine and
llama.cpp's grammar sampler, bench/grammar_engines.py on llguidance and xgrammar): the schema, one
document valid under it, and a tokenizer-free way to spell that document in a vocabulary's tokens.
No imports beyond the standard library, so any virtual environment can run it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 16,
            "maxItems": 16,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "qty": {"type": "integer"},
                    "tags": {"type": "array", "items": {"enum": ["new", "sale", "fragile"]}, "maxItems": 2},
                },
                "required": ["name", "qty", "tags"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}

_NAMES = ["apples", "rice 5 kg", "olive oil", "tea", "paper towels", "salt", "oat milk", "pasta"]
_TAGS = [[], ["new"], ["sale"], ["fragile", "sale"]]


def document() -> str:
    """A document valid under SCHEMA, in the compact-with-spaces layout llama.cpp's JSON grammar allows."""
    items = [{"name": _NAMES[i % len(_NAMES)], "qty": 3 * i + 1, "tags": _TAGS[i % len(_TAGS)]} for i in range(16)]
    return json.dumps({"items": items}, separators=(", ", ": "))


class GreedySpeller:
    """Text spelled as token ids by longest match over a vocabulary (the bytes of each token). Not the
    model's own BPE split, but a valid spelling: a grammar matcher accepts any token sequence whose
    bytes it accepts, and its mask cost depends on the grammar's state, not on how it got there."""

    def __init__(self, vocab: Sequence[bytes], max_len: int = 32) -> None:
        self.max_len = max_len
        self.by_bytes: dict[bytes, int] = {}
        for i, piece in enumerate(vocab):
            if piece and len(piece) <= max_len:
                self.by_bytes.setdefault(piece, i)

    def __call__(self, data: bytes) -> list[int]:
        out, at = [], 0
        while at < len(data):
            for size in range(min(self.max_len, len(data) - at), 0, -1):
                token = self.by_bytes.get(data[at : at + size])
                if token is not None:
                    out.append(token)
                    at += size
                    break
            else:
                raise ValueError(f"no token spells byte {data[at]!r} at {at}")
        return out
