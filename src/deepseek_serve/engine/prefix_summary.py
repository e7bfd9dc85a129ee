"""A compact, bounded summary of what a prefix cache holds: chained hashes of token blocks.

An engine's load report carries it; a gateway holding the same tokenizer hashes a prompt's token
ids the same way and finds, per engine, how many leading blocks of the prompt that engine holds.

Block i's hash covers tokens [0, (i + 1) * BLOCK_TOKENS) of a sequence (each block's digest is
keyed with the previous one's), so one set of digests stands for a tree of cached prefixes: a
shared system prompt appears once however many cached conversations start with it. Only whole
blocks are hashed, at most `MAX_DEPTH_TOKENS` leading tokens per sequence, and a summary holds at
most `MAX_SUMMARY_BLOCKS` digests, taken from the most recently used entries first, each entry's
blocks from its first one on (so the set stays prefix-closed). On the wire the digests are
concatenated and base64-encoded: 1,024 blocks = 8 KiB raw, about 11 KiB in the report.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import sys
from array import array
from collections.abc import Iterable, Sequence

BLOCK_TOKENS = 32
"""Tokens per hashed block."""

MAX_DEPTH_TOKENS = 4096
"""Leading tokens of a sequence that are hashed (a longer shared prefix adds nothing to routing)."""

MAX_SUMMARY_BLOCKS = 1024
"""Digests one summary holds at most."""

DIGEST_BYTES = 8
SCHEME = f"blake2b-{DIGEST_BYTES * 8}/u32le/{BLOCK_TOKENS}"
"""Names the hash, token encoding and block size; a reader ignores a summary of another scheme."""


def block_hashes(token_ids: Sequence[int], max_tokens: int = MAX_DEPTH_TOKENS) -> list[bytes]:
    """The chained digest of each whole block among the first `max_tokens` tokens, first block first."""
    n = min(len(token_ids), max_tokens) // BLOCK_TOKENS
    if n == 0:
        return []
    ids = array("I", token_ids[: n * BLOCK_TOKENS])  # token ids are < 2**32
    if sys.byteorder == "big":
        ids.byteswap()
    data = ids.tobytes()
    step = BLOCK_TOKENS * 4
    out: list[bytes] = []
    previous = b""
    for i in range(n):
        previous = hashlib.blake2b(data[i * step : (i + 1) * step], digest_size=DIGEST_BYTES, key=previous).digest()
        out.append(previous)
    return out


def summarize(entries: Iterable[Sequence[int]], max_blocks: int = MAX_SUMMARY_BLOCKS) -> list[bytes]:
    """Distinct block digests of `entries` (most recently used first), at most `max_blocks`."""
    seen: dict[bytes, None] = {}
    for tokens in entries:
        for digest in block_hashes(tokens):
            if len(seen) >= max_blocks:
                return list(seen)
            seen.setdefault(digest)
    return list(seen)


def encode(digests: Sequence[bytes]) -> str:
    return base64.b64encode(b"".join(digests)).decode("ascii")


def decode(text: str, max_blocks: int = MAX_SUMMARY_BLOCKS) -> frozenset[bytes]:
    """The digests of an encoded summary; ValueError when it is malformed or over `max_blocks`."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("prefix summary is not base64") from None
    if len(raw) % DIGEST_BYTES or len(raw) // DIGEST_BYTES > max_blocks:
        raise ValueError("prefix summary has a bad length")
    return frozenset(raw[i : i + DIGEST_BYTES] for i in range(0, len(raw), DIGEST_BYTES))


def matched_blocks(prompt_hashes: Sequence[bytes], held: frozenset[bytes]) -> int:
    """How many leading blocks of the prompt `held` contains."""
    n = 0
    for digest in prompt_hashes:
        if digest not in held:
            break
        n += 1
    return n
