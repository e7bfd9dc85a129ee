"""engine/prefix_summary.py: the prefix-cache summary an engine reports and a gateway reads.

Pure functions over token ids; the load report that carries a real engine's summary is checked in
tests/gateway/test_pool.py.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest

from deepseek_serve.engine import prefix_summary
from deepseek_serve.engine.prefix_summary import BLOCK_TOKENS, MAX_DEPTH_TOKENS, block_hashes, matched_blocks


def ids(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def test_block_hashes_are_chained_whole_blocks() -> None:
    a = block_hashes(ids(100))
    assert len(a) == 100 // BLOCK_TOKENS and len(set(a)) == len(a)
    assert block_hashes(ids(BLOCK_TOKENS - 1)) == []
    # a longer sequence with the same start shares the leading digests
    assert block_hashes(ids(200))[: len(a)] == a
    # one different token changes its block and every later one, not the earlier ones
    changed = ids(100)
    changed[BLOCK_TOKENS + 3] = 99_999
    b = block_hashes(changed)
    assert b[0] == a[0] and all(x != y for x, y in zip(a[1:], b[1:], strict=True))
    # the same block after a different prefix hashes differently
    assert block_hashes(ids(BLOCK_TOKENS) + ids(BLOCK_TOKENS))[1] != block_hashes(ids(BLOCK_TOKENS, 7) + ids(32))[1]
    assert len(block_hashes(ids(MAX_DEPTH_TOKENS * 2))) == MAX_DEPTH_TOKENS // BLOCK_TOKENS


def test_digests_are_the_same_in_another_process() -> None:
    """Engine and gateway are different processes (and machines): nothing may depend on hash seeds."""
    code = (
        "from deepseek_serve.engine.prefix_summary import block_hashes; print(block_hashes(list(range(64)))[1].hex())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert other.stdout.strip() == block_hashes(ids(64))[1].hex()


def test_summary_shares_common_prefixes_and_stays_prefix_closed() -> None:
    system = ids(256, 1000)
    entries = [system + ids(128, 5000 + 1000 * i) for i in range(5)]
    digests = prefix_summary.summarize(entries)
    assert len(digests) == 256 // BLOCK_TOKENS + 5 * 128 // BLOCK_TOKENS  # the system prompt once
    held = frozenset(digests)
    for entry in entries:
        assert matched_blocks(block_hashes(entry + ids(50, 9)), held) == len(entry) // BLOCK_TOKENS
    assert matched_blocks(block_hashes(system + ids(64, 42)), held) == 256 // BLOCK_TOKENS
    # bounded: the first (most recent) entries whole, then the start of the next, nothing after
    capped = frozenset(prefix_summary.summarize(entries, max_blocks=14))
    assert len(capped) == 14
    assert [matched_blocks(block_hashes(e), capped) for e in entries] == [12, 10, 8, 8, 8]


def test_encode_decode_round_trip_and_refusals() -> None:
    digests = prefix_summary.summarize([ids(300), ids(100, 50)])
    text = prefix_summary.encode(digests)
    assert prefix_summary.decode(text) == frozenset(digests)
    assert prefix_summary.decode("") == frozenset()
    with pytest.raises(ValueError, match="base64"):
        prefix_summary.decode("not base64!")
    with pytest.raises(ValueError, match="length"):
        prefix_summary.decode(base64.b64encode(b"123").decode())
    with pytest.raises(ValueError, match="length"):
        prefix_summary.decode(prefix_summary.encode(digests), max_blocks=len(digests) - 1)
