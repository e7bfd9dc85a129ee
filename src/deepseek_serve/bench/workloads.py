"""Workloads: deterministic request bodies. Request `i` of a workload with seed `s` is always the same,
whatever the server, the timing or the concurrency, so runs against different servers compare like
with like.

- `short`:       a one-line question, short answer
- `long-prompt`: a long passage (about `prompt_words` words) and a one-sentence summary request
- `long-gen`:    a short request for a long answer
- `multi-turn`:  conversations sharing one long system prompt; request i is turn `i % turns` of
                 conversation `i // turns`, carrying the earlier turns (scripted answers), so
                 consecutive requests extend the same prefix
- `repeat`:      the same request every time (what a response cache is for)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal

Endpoint = Literal["chat", "completions"]

WORKLOADS = ("short", "long-prompt", "long-gen", "multi-turn", "repeat")

# max_tokens used when the command line gives none
DEFAULT_MAX_TOKENS = {"short": 64, "long-prompt": 32, "long-gen": 512, "multi-turn": 64, "repeat": 64}

_TOPICS = (
    "the ocean",
    "mountains",
    "a lighthouse",
    "bread",
    "the moon",
    "trains",
    "bees",
    "a library",
    "winter",
    "rivers",
    "a garden",
    "clocks",
    "volcanoes",
    "the desert",
    "bicycles",
    "coffee",
    "a violin",
    "forests",
    "bridges",
    "the wind",
    "glaciers",
    "owls",
    "a market",
    "paper",
)
_WORDS = (
    "the",
    "a",
    "small",
    "old",
    "river",
    "city",
    "light",
    "stone",
    "morning",
    "people",
    "walked",
    "along",
    "quiet",
    "road",
    "under",
    "bright",
    "sky",
    "while",
    "children",
    "played",
    "near",
    "market",
    "where",
    "farmers",
    "sold",
    "fresh",
    "bread",
    "and",
    "apples",
    "every",
    "day",
    "in",
    "summer",
    "winter",
    "cold",
    "wind",
    "came",
    "from",
    "north",
    "hills",
    "over",
    "valley",
    "long",
    "history",
    "built",
    "bridge",
    "across",
    "water",
    "ships",
    "carried",
    "salt",
    "wool",
    "to",
    "distant",
    "towns",
    "scholars",
    "wrote",
    "books",
    "about",
    "stars",
    "seasons",
    "harvest",
    "festival",
    "music",
    "lanterns",
    "evening",
    "slowly",
    "changed",
    "new",
    "railway",
    "brought",
    "visitors",
    "who",
    "stayed",
    "for",
    "weeks",
    "learned",
    "old",
    "songs",
    "of",
    "fishermen",
    "storms",
    "lighthouse",
    "keeper",
    "watched",
    "sea",
    "each",
    "night",
)
_SYSTEM_PROMPT_WORDS = 300


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: the workload it belongs to and its JSON body (without `model`, `stream`)."""

    index: int
    workload: str
    body: dict[str, Any] = field(hash=False)


def _sentence(rng: random.Random, num_words: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(num_words)]
    return " ".join(words).capitalize() + "."


def _passage(rng: random.Random, num_words: int) -> str:
    sentences: list[str] = []
    total = 0
    while total < num_words:
        n = rng.randint(8, 20)
        sentences.append(_sentence(rng, n))
        total += n
    return " ".join(sentences)


class Workload:
    """Makes request `i` of a named workload. `max_tokens`/`temperature` apply to every request."""

    def __init__(
        self,
        name: str,
        *,
        seed: int = 0,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        endpoint: Endpoint = "chat",
        prompt_words: int = 600,
        turns: int = 4,
    ) -> None:
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; choose one of: {', '.join(WORKLOADS)}")
        if turns < 1:
            raise ValueError("turns must be at least 1")
        self.name = name
        self.seed = seed
        self.max_tokens = max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS[name]
        self.temperature = temperature
        self.endpoint = endpoint
        self.prompt_words = prompt_words
        self.turns = turns
        self._system_prompt = (
            "You are a helpful assistant for a town archive. Answer briefly and precisely. Background: "
            + _passage(random.Random(f"{seed}:system"), _SYSTEM_PROMPT_WORDS)
        )

    def request(self, index: int) -> RequestSpec:
        messages = self._messages(index)
        body: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.endpoint == "chat":
            body["messages"] = messages
        else:
            body["prompt"] = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"
        return RequestSpec(index=index, workload=self.name, body=body)

    def _messages(self, index: int) -> list[dict[str, str]]:
        # a string seed hashes deterministically (sha512), unlike hash() of a tuple.
        rng = random.Random(f"{self.seed}:{self.name}:{index}")
        topic = rng.choice(_TOPICS)
        if self.name == "short":
            return [{"role": "user", "content": f"Write one sentence about {topic}."}]
        if self.name == "long-prompt":
            passage = _passage(rng, self.prompt_words)
            return [{"role": "user", "content": f"{passage}\n\nSummarize the text above in one sentence."}]
        if self.name == "long-gen":
            return [{"role": "user", "content": f"Write a long, detailed story about {topic}."}]
        if self.name == "repeat":
            return [{"role": "user", "content": "Name three colours of the rainbow."}]
        # multi-turn
        conversation, turn = divmod(index, self.turns)
        conv_rng = random.Random(f"{self.seed}:conversation:{conversation}")
        messages = [{"role": "system", "content": self._system_prompt}]
        for t in range(turn + 1):
            question = f"Question {t + 1}: what does the archive say about {conv_rng.choice(_TOPICS)}?"
            answer = _sentence(conv_rng, conv_rng.randint(15, 30))
            messages.append({"role": "user", "content": question})
            if t < turn:
                messages.append({"role": "assistant", "content": answer})
        return messages
