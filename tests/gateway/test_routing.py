"""PrefixRouter: conversation homes (rendezvous hashing), prefix affinity from its own memory and from
the upstreams' reported prefix caches, the busy margin, two random choices, bounded memory.

The router is pure logic over names, load figures and digests, so these tests need no upstream
processes; the gateway's own tests run it against real engines.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest

from deepseek_serve.engine import prefix_summary
from deepseek_serve.engine.prefix_summary import BLOCK_TOKENS
from deepseek_serve.gateway.routing import (
    BLOCK_CHARS,
    MIN_MATCH_CHARS,
    MIN_MATCH_TOKENS,
    Candidate,
    PrefixRouter,
    rendezvous_order,
)

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


def test_conversation_goes_to_its_home_unless_clearly_busier() -> None:
    router = PrefixRouter(busy_margin=0.5, seed=0)
    home, other = rendezvous_order("conv-1", ["a", "b"])
    # the home is busier, but within the margin: the conversation stays
    assert router.choose("hello", "conv-1", loads(**{home: 0.5, other: 0.0})) == home
    assert router.choose("hello again", "conv-1", loads(**{home: 0.5, other: 0.0})) == home
    # beyond the margin it moves to the less loaded one
    assert router.choose("hello again", "conv-1", loads(**{home: 0.51, other: 0.0})) == other
    # and back home once the load evens out
    assert router.choose("hello again", "conv-1", loads(**{home: 0.2, other: 0.0})) == home


def test_replicas_agree_on_every_conversations_upstream() -> None:
    """Two gateways with different histories and random streams send each conversation to the same
    upstream, also when the home is too busy (the next in its rendezvous order that is not)."""
    names = [f"engine-{i}" for i in range(6)]
    first, second = PrefixRouter(seed=1), PrefixRouter(seed=2)
    for i in range(50):  # unrelated traffic that only the first router saw
        first.observe(f"other prompt {i} " * 30, None, names[i % 3])
    homes = Counter()
    for i in range(600):
        conversation = f"conversation-{i}"
        calm = [Candidate(n, 0.1 * (j % 3)) for j, n in enumerate(names)]
        picked = first.choose(SYSTEM + str(i), conversation, calm)
        assert second.choose(SYSTEM + str(i), conversation, list(reversed(calm))) == picked
        homes[picked] += 1
        busy = [Candidate(n, 3.0 if n == picked else 0.1 * (j % 3)) for j, n in enumerate(names)]
        moved = first.choose(SYSTEM, conversation, busy)
        assert moved != picked and second.choose(SYSTEM, conversation, busy[::-1]) == moved
    # homes spread over the whole pool (600 / 6 = 100 each on average; loads within the margin)
    assert set(homes) == set(names) and min(homes.values()) > 60, homes


def test_removing_an_upstream_moves_only_its_own_conversations() -> None:
    names = [f"e{i}" for i in range(5)]
    router = PrefixRouter(seed=0)
    before = {f"c{i}": router.choose("x", f"c{i}", loads(**dict.fromkeys(names, 0.0))) for i in range(300)}
    rest = [n for n in names if n != "e2"]
    after = {c: router.choose("x", c, loads(**dict.fromkeys(rest, 0.0))) for c in before}
    moved = {c for c in before if before[c] != after[c]}
    assert moved == {c for c, n in before.items() if n == "e2"} and moved


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
    router.observe(SYSTEM, None, "gone")
    assert router.choose(SYSTEM, None, loads(a=0.3, b=0.1)) == "b"


def test_drop_forgets_an_upstream() -> None:
    router = PrefixRouter(seed=0)
    router.observe(SYSTEM, None, "b")
    router.observe(SYSTEM, None, "c")
    router.drop("b")
    assert router.choose(SYSTEM, None, loads(a=0.0, b=0.0, c=0.2)) == "c"
    router.drop("c")
    assert router.choose(SYSTEM, None, loads(a=0.0, c=0.2)) == "a"
    assert router._prefixes == {} and not router._held


def test_prefix_beyond_prefix_chars_is_not_compared() -> None:
    router = PrefixRouter(prefix_chars=1024, seed=0)
    assert len(router._hashes("z" * 1_000_000)) == 1024 // BLOCK_CHARS
    router.observe("k" * 1024 + "one ending", None, "b")
    assert router.choose("k" * 1024 + "another ending", None, loads(a=0.0, b=0.1)) == "b"


def test_memory_is_bounded_and_least_recently_used_goes_first() -> None:
    router = PrefixRouter(max_entries=8, prefix_chars=128, seed=0)
    router.observe("old " * 100, None, "b")
    router.observe("kept " * 100, None, "b")
    for i in range(20):
        if i % 2 == 0:  # kept keeps being served
            router.observe("kept " * 100, None, "b")
        router.observe(f"{i} other " * 50, None, "c")
    assert len(router._prefixes) <= 8
    assert router.choose("old " * 100, None, loads(a=0.0, b=0.1)) == "a"
    assert router.choose("kept " * 100, None, loads(a=0.0, b=0.1)) == "b"
    for i in range(100):  # the text hashes kept from `choose` for `observe` are bounded too
        router.choose(f"prompt {i}", None, loads(a=0.0, b=0.1))
    assert len(router._recent) <= 64


def test_same_seed_same_choices_and_seeds_differ() -> None:
    def run(seed: int) -> list[str]:
        router = PrefixRouter(seed=seed)
        names = [f"e{i}" for i in range(16)]
        out = []
        for i in range(200):
            candidates = [Candidate(n, (i * 7 + j * 3) % 5 / 4) for j, n in enumerate(names)]
            conversation = str(i % 17) if i % 2 else None
            name = router.choose(f"{i % 13} " * (i % 50 + 1) * 10, conversation, candidates)
            router.observe(f"{i % 13} " * (i % 50 + 1) * 10, conversation, name)
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


# --- the upstreams' reported prefix caches ------------------------------------------------------------
def reported(name: str, load: float, *cached: list[int]) -> Candidate:
    return Candidate(name, load, frozenset(prefix_summary.summarize(cached)))


def tokens(n: int, seed: int = 0) -> list[int]:
    return [(seed * 7919 + i * 31) % 50_000 for i in range(n)]


def test_prompt_goes_to_the_upstream_reporting_its_long_prefix() -> None:
    router = PrefixRouter(busy_margin=0.5, seed=0)
    history = tokens(400)
    prompt = history + tokens(100, seed=1)  # the next turn: the cached history, then a new question
    text = "unrelated text the router never saw"
    pool = [reported("a", 0.0), reported("b", 0.4, history, tokens(300, seed=2)), reported("c", 0.0, tokens(300, 3))]
    assert router.choose(text, None, pool, prompt) == "b"
    # clearly busier: by load instead
    busy = [reported("a", 0.0), reported("b", 0.6, history), reported("c", 0.0)]
    assert router.choose(text, None, busy, prompt) in ("a", "c")
    # without token ids (or for a conversation, which has its home) the reports are not consulted
    assert router.choose(text, None, [reported("a", 0.0), reported("b", 0.2, history)]) == "a"


def test_short_or_minor_reported_prefix_does_not_count() -> None:
    router = PrefixRouter(seed=0)
    short = tokens(MIN_MATCH_TOKENS - BLOCK_TOKENS)
    assert router.choose("q", None, [reported("a", 0.0), reported("b", 0.1, short)], short + tokens(20, 1)) == "a"
    shared = tokens(512)
    pool = [reported("a", 0.0), reported("b", 0.1, shared + tokens(64, 5))]
    assert router.choose("q", None, pool, shared + tokens(500, 1)) == "b"  # 512 of 1012: half
    assert router.choose("q", None, pool, shared + tokens(540, 1)) == "a"  # 512 of 1052: under half
    # a prompt shorter than one block matches nothing
    assert router.choose("q", None, [reported("a", 0.0), reported("b", 0.1, tokens(8))], tokens(8)) == "a"


def test_longest_reported_prefix_wins_then_the_least_loaded() -> None:
    router = PrefixRouter(busy_margin=1.0, seed=0)
    system = tokens(256)
    conversation = system + tokens(512, seed=1)
    prompt = conversation + tokens(40, seed=2)
    pool = [reported("a", 0.0, system), reported("b", 0.5, conversation), reported("c", 0.2, system)]
    assert router.choose("q", None, pool, prompt) == "b"
    prompt = system + tokens(200, seed=3)  # only the system prompt is shared: a and c hold it alike
    assert router.choose("q", None, pool, prompt) == "a"


def test_reported_and_remembered_prefixes_the_larger_share_wins() -> None:
    router = PrefixRouter(busy_margin=1.0, seed=0)
    text = SYSTEM + "user: first question"
    router.observe(text, None, "a")  # this gateway sent the whole text to a
    ids = tokens(600)
    half = [reported("a", 0.0), reported("b", 0.0, ids[:320])]
    # remembered: the whole prompt on a; reported: about half of it on b
    assert router.choose(text, None, half, ids) == "a"
    # another gateway sent the follow-up's history to b, as b's report shows: b covers more of it
    follow_up = SYSTEM + "user: first question assistant: " + "an answer " * 150
    whole = [reported("a", 0.0), reported("b", 0.0, ids)]
    assert router.choose(follow_up, None, whole, [*ids, 1]) == "b"
    assert router.choose(follow_up, None, half, [*ids, 1]) == "a"


def test_summary_is_bounded_and_cheap_to_query() -> None:
    entries = [tokens(4096, seed=s) for s in range(20)]
    digests = prefix_summary.summarize(entries)
    assert len(digests) == prefix_summary.MAX_SUMMARY_BLOCKS
    # the most recent entries (first) are in whole; the oldest are cut
    held = frozenset(digests)
    assert prefix_summary.matched_blocks(prefix_summary.block_hashes(entries[0]), held) == 4096 // BLOCK_TOKENS
    assert prefix_summary.matched_blocks(prefix_summary.block_hashes(entries[-1]), held) == 0
