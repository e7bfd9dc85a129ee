"""PrefixRouter: conversation and prefix affinity, the busy margin, two random choices, bounded memory.

The router is pure logic over names and load figures, so these tests need no upstream processes;
the gateway's own tests run it against real engines.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest

from deepseek_serve.gateway.routing import BLOCK_CHARS, MIN_MATCH_CHARS, Candidate, PrefixRouter

SYSTEM = "You are a careful assistant for the town archive. " * 40  # ~2,000 characters


def loads(**by_name: float) -> list[Candidate]:
    return [Candidate(name, load) for name, load in by_name.items()]


def test_two_choices_with_two_candidates_takes_the_less_loaded() -> None:
    router = PrefixRouter(seed=0)
    for i in range(20):
        assert router.choose(f"prompt {i}", None, loads(a=0.7, b=0.2)) == "b"
        assert router.choose(f"prompt {i}", None, loads(a=0.1, b=0.2)) == "a"


def test_two_choices_never_picks_the_busiest_and_spreads_over_the_rest() -> None:
    router = PrefixRouter(seed=1)
    candidates = loads(a=0.0, b=0.0, c=0.0, d=5.0)
    picks = Counter(router.choose(f"p{i}", None, candidates) for i in range(300))
    assert picks["d"] == 0
    assert set(picks) == {"a", "b", "c"} and min(picks.values()) > 50


def test_single_candidate() -> None:
    assert PrefixRouter(seed=0).choose("x", "conv", loads(only=9.0)) == "only"


def test_conversation_returns_to_its_upstream_unless_clearly_busier() -> None:
    router = PrefixRouter(busy_margin=0.5, seed=0)
    router.observe("hello", "conv-1", "b")
    # b is busier, but within the margin: the conversation stays
    assert router.choose("hello again", "conv-1", loads(a=0.0, b=0.5)) == "b"
    # beyond the margin it moves to the less loaded one
    assert router.choose("hello again", "conv-1", loads(a=0.0, b=0.51)) == "a"
    # another conversation with the same short text has no affinity
    assert router.choose("hello again", "conv-2", loads(a=0.0, b=0.3)) == "a"


def test_long_shared_prefix_returns_to_its_upstream() -> None:
    router = PrefixRouter(busy_margin=0.5, seed=0)
    first = SYSTEM + "user: what is in the archive?"
    router.observe(first, None, "b")
    follow_up = first + " assistant: maps and letters. user: which letters?"
    assert router.choose(follow_up, None, loads(a=0.0, b=0.4)) == "b"
    assert router.choose(follow_up, None, loads(a=0.0, b=0.6)) == "a"
    # an unrelated prompt goes by load
    assert router.choose("x" * 3000, None, loads(a=0.0, b=0.4)) == "a"


def test_short_or_minor_shared_prefix_does_not_count() -> None:
    router = PrefixRouter(seed=0)
    short = "s" * (MIN_MATCH_CHARS - BLOCK_CHARS)
    router.observe(short + "tail one", None, "b")
    assert router.choose(short + "tail two", None, loads(a=0.0, b=0.1)) == "a"
    # a long prefix that is under half of the new prompt
    shared = "p" * 1024
    router.observe(shared, None, "b")
    assert router.choose(shared + "q" * 1024, None, loads(a=0.0, b=0.1)) == "b"
    assert router.choose(shared + "q" * 1200, None, loads(a=0.0, b=0.1)) == "a"


def test_identical_short_prompt_counts_as_a_whole_match() -> None:
    router = PrefixRouter(seed=0)
    router.observe("Name three colours.", None, "b")
    assert router.choose("Name three colours.", None, loads(a=0.0, b=0.2)) == "b"
    assert router.choose("Name three colours!", None, loads(a=0.0, b=0.2)) == "a"


def test_prefix_served_by_several_upstreams_goes_to_the_least_loaded_of_them() -> None:
    router = PrefixRouter(busy_margin=1.0, seed=0)
    for name in ("a", "b", "c"):
        router.observe(SYSTEM + f"user: question for {name}", None, name)
    prompt = SYSTEM + "user: a new question"
    assert router.choose(prompt, None, loads(a=0.5, b=0.2, c=0.4, d=0.0)) == "b"
    assert router.choose(prompt, None, loads(a=0.1, b=0.2, c=0.4, d=0.0)) == "a"


def test_owner_missing_from_candidates_falls_back_to_load() -> None:
    router = PrefixRouter(seed=0)
    router.observe(SYSTEM, "conv", "gone")
    assert router.choose(SYSTEM, "conv", loads(a=0.3, b=0.1)) == "b"


def test_drop_forgets_an_upstream() -> None:
    router = PrefixRouter(seed=0)
    router.observe(SYSTEM, "conv", "b")
    router.observe(SYSTEM, None, "c")
    router.drop("b")
    assert router.choose(SYSTEM, "conv", loads(a=0.0, b=0.0, c=0.2)) == "c"
    router.drop("c")
    assert router.choose(SYSTEM, "conv", loads(a=0.0, c=0.2)) == "a"
    assert router._prefixes == {} and not router._conversations


def test_prefix_beyond_prefix_chars_is_not_compared() -> None:
    router = PrefixRouter(prefix_chars=1024, seed=0)
    assert len(router._hashes("z" * 1_000_000)) == 1024 // BLOCK_CHARS
    router.observe("k" * 1024 + "one ending", None, "b")
    assert router.choose("k" * 1024 + "another ending", None, loads(a=0.0, b=0.1)) == "b"


def test_memory_is_bounded_and_least_recently_used_goes_first() -> None:
    router = PrefixRouter(max_entries=8, seed=0)
    router.observe("old " * 100, "old-conv", "b")
    router.observe("kept " * 100, "kept-conv", "b")
    for i in range(20):
        if i % 4 == 0:  # kept-conv keeps being served
            router.observe("kept " * 100, "kept-conv", "b")
        router.observe(f"{i} other " * 50, f"conv-{i}", "c")
    assert len(router._prefixes) <= 8 and len(router._conversations) <= 8
    assert router.choose("old " * 100, "old-conv", loads(a=0.0, b=0.1)) == "a"
    assert router.choose("kept " * 100, "kept-conv", loads(a=0.0, b=0.1)) == "b"


def test_same_seed_same_choices_and_seeds_differ() -> None:
    def run(seed: int) -> list[str]:
        router = PrefixRouter(seed=seed)
        names = [f"e{i}" for i in range(16)]
        out = []
        for i in range(200):
            candidates = [Candidate(n, (i * 7 + j * 3) % 5 / 4) for j, n in enumerate(names)]
            name = router.choose(f"{i % 13} " * (i % 50 + 1) * 10, str(i % 17), candidates)
            router.observe(f"{i % 13} " * (i % 50 + 1) * 10, str(i % 17), name)
            out.append(name)
        return out

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_bad_input_is_refused() -> None:
    router = PrefixRouter(seed=0)
    with pytest.raises(ValueError, match="no candidates"):
        router.choose("x", None, [])
    with pytest.raises(ValueError, match="unique"):
        router.choose("x", None, [Candidate("a", 0.0), Candidate("a", 1.0)])
    for bad in (math.nan, -0.1):
        with pytest.raises(ValueError, match="load"):
            Candidate("a", bad)
    with pytest.raises(ValueError, match="name"):
        Candidate("", 0.0)
    assert Candidate("a", math.inf).load == math.inf
    for kwargs in ({"busy_margin": -1.0}, {"busy_margin": math.nan}, {"prefix_chars": 10}, {"max_entries": 0}):
        with pytest.raises(ValueError):
            PrefixRouter(**kwargs)


def test_equal_loads_go_to_the_upstream_holding_fewer_prefixes() -> None:
    router = PrefixRouter(busy_margin=1.0, seed=0)
    router.observe(SYSTEM + "user: second", None, "b")
    for i in range(3):
        router.observe(f"conversation {i} " * 40, None, "a")
    router.observe(SYSTEM + "user: first", None, "a")
    # two candidates, equal load, no shared prefix: the one holding less, whichever is drawn first
    for i in range(10):
        assert router.choose(f"unrelated {i} " * 40, None, loads(a=0.25, b=0.25)) == "b"
    # both hold the system prompt, a most recently: the one holding less wins the tie
    assert router.choose(SYSTEM + "user: third", None, loads(a=0.25, b=0.25, c=0.25)) == "b"
    # load still comes first
    assert router.choose(SYSTEM + "user: third", None, loads(a=0.0, b=0.25, c=0.25)) == "a"
