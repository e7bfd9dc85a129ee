"""Runners, the model half of the engine: the interface, and `build_runner`, the one way to make one.

A runner owns the weights, the tokenizer and the KV cache of every sequence. The scheduler owns
everything else (queues, admission order, deadlines, stop conditions, detokenization). One
`step()` runs ONE forward pass over a batch that mixes prefill chunks and decode tokens of
different sequences, and samples the next token for every sequence whose input is complete.

Two runners implement it, each a package: `llamacpp.LlamaCppRunner` (GGUF on CPU, llama.cpp's unified
KV cache, one sequence id per slot) and `pytorch.TorchRunner` (Hugging Face checkpoints, a
pre-allocated slot KV cache). Both are built by `from_settings(settings, model_path)`; `build_runner`
picks the one for a resolved model.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from deepseek_serve.config import Settings
    from deepseek_serve.engine.sequence import Sequence
    from deepseek_serve.engine.types import TokenLogprob
    from deepseek_serve.models.resolve import ResolvedModel


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step: feed `num_new_tokens` tokens starting at
    `seq.num_computed_tokens` (from `seq.all_token_ids`), then sample iff `sample`."""

    seq: Sequence
    num_new_tokens: int
    sample: bool


@dataclass(frozen=True)
class SampleResult:
    """The token sampled for one entry, or `error`: this entry alone failed (its input could not be
    handed to the native library, or its sampling raised) and the engine ends its request.

    With speculative decoding one step may yield several tokens: `token_id` first, then `more` in
    order (the guesses accepted after the first, then the step's own token); `drafted` counts the
    guesses verified, `len(more)` of which were accepted. The runner has then advanced
    `seq.num_computed_tokens` past every token but the last; the engine may keep fewer (a stop token,
    stop string or max_tokens inside the run), and freeing the sequence drops the KV beyond.
    """

    token_id: int
    logprob: TokenLogprob | None = None
    error: str | None = None
    more: tuple[tuple[int, TokenLogprob | None], ...] = ()
    drafted: int = 0
    guesser: str | None = None  # which guesser proposed the drafts ("ngram", "draft")

    @classmethod
    def failed(cls, error: str) -> SampleResult:
        return cls(-1, None, error)

    @classmethod
    def run(cls, drawn: list[SampleResult], drafted: int, guesser: str | None) -> SampleResult:
        """One result for the tokens of a speculative step, in order."""
        first = drawn[0]
        more = tuple((r.token_id, r.logprob) for r in drawn[1:])
        return cls(first.token_id, first.logprob, None, more, drafted, guesser)

    def tokens(self) -> list[tuple[int, TokenLogprob | None]]:
        """(token id, logprob) of every token of the step, in order."""
        return [(self.token_id, self.logprob), *self.more]


class LaunchedStep:
    """A step the runner has started: `results()` waits for its sampled tokens (once the device has
    them) and returns one result per entry of `batch`, as `Runner.step` does. `done`: the results are
    already on the host."""

    def __init__(
        self, batch: list[ScheduledSeq], collect: Callable[[], list[SampleResult | None]], done: bool = False
    ) -> None:
        self.batch = batch
        self.done = done
        self._collect = collect

    def results(self) -> list[SampleResult | None]:
        return self._collect()

    @classmethod
    def finished(cls, batch: list[ScheduledSeq], results: list[SampleResult | None]) -> LaunchedStep:
        return cls(batch, lambda: results, done=True)


class Tokenizer(abc.ABC):
    """Token ids <-> text. `token_bytes` lets the engine detokenize incrementally, byte-exact."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abc.abstractmethod
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: EOS and end-of-turn tokens (e.g. <|im_end|>, <|EOT|>)."""

    @property
    @abc.abstractmethod
    def bos_token(self) -> str | None: ...

    @property
    @abc.abstractmethod
    def eos_token(self) -> str | None: ...

    @abc.abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize; special tokens written in `text` (e.g. "<|im_start|>") are parsed as such."""

    @abc.abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (b"" for control tokens such as EOS)."""

    def decode(self, token_ids: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in token_ids).decode("utf-8", errors="replace")


class Runner(abc.ABC):
    """Weights + KV cache for up to `max_num_seqs` concurrent sequences. Not thread-safe: the engine
    calls it from its one worker thread only."""

    name: str
    supports_grammar: bool = False  # honours SamplingParams.grammar (constrained decoding)

    @classmethod
    def from_settings(cls, settings: Settings, model_path: Path) -> Runner:
        """Load the model at `model_path` with the settings that concern this runner (what
        `build_runner` calls; runners it does not build, such as test doubles, leave it out)."""
        raise NotImplementedError(f"{cls.__name__} is not built from settings")

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Tokenizer: ...

    @property
    @abc.abstractmethod
    def max_num_seqs(self) -> int:
        """Sequences that can hold KV at the same time (slots)."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """Longest sequence (prompt + completion) the runner accepts."""

    @property
    @abc.abstractmethod
    def kv_capacity_tokens(self) -> int: ...

    @property
    @abc.abstractmethod
    def kv_used_tokens(self) -> int:
        """Tokens held by running sequences (reserved, not only written)."""

    @property
    def kv_cached_tokens(self) -> int:
        """Tokens idle prefix-cache entries hold (evictable at any time)."""
        return 0

    def cached_prefixes(self) -> list[tuple[int, ...] | list[int]]:
        """The token ids of each idle prefix-cache entry, most recently used first. Unlike the rest of
        the runner, safe to call from any thread: entries are replaced, never mutated in place, so
        a caller sees each entry as it was at some moment (the list may be one change behind)."""
        return []

    @property
    @abc.abstractmethod
    def chat_template(self) -> str | None:
        """The model's own Jinja chat template, if it has one."""

    @abc.abstractmethod
    def can_allocate(self, seq: Sequence) -> bool:
        """Whether `seq` (prompt + max_tokens) fits now, counting evictable prefix-cache entries as free."""

    @abc.abstractmethod
    def allocate(self, seq: Sequence) -> int:
        """Give `seq` a slot and its KV budget, reusing cached prefix tokens when possible.

        Sets `seq.slot` and `seq.num_computed_tokens`; returns the number of prompt tokens reused.
        At least one prompt token is always left to compute (its logits are needed to sample).
        """

    @abc.abstractmethod
    def step(self, batch: list[ScheduledSeq]) -> list[SampleResult | None]:
        """One forward pass over the batch; one result per entry (None where `sample` is False).

        The runner advances `seq.num_computed_tokens` by `num_new_tokens` for every entry that did not
        fail. An entry whose input the runner refuses (token ids outside the vocabulary, positions
        beyond its reservation) or whose sampling raises gets `SampleResult.failed(...)`, whether it
        samples or not, and the others go on; an exception means the whole step failed.
        """

    # overlapped steps: a runner that sets `supports_overlap` can start step N+1 before the engine has
    # taken in step N's tokens (the sampled ids stay on the device and feed N+1), so the host's
    # bookkeeping of step N runs while the device computes N+1
    supports_overlap: bool = False

    def launch(self, batch: list[ScheduledSeq]) -> LaunchedStep:
        """Start one step (same contract as `step`). Without overlap it runs at once."""
        return LaunchedStep.finished(batch, self.step(batch))

    def can_launch_ahead(self, batch: list[ScheduledSeq]) -> bool:
        """Whether `batch` may be launched while the last launched step's results are not yet taken
        in. Its decode entries whose sequence's last token is not yet known (`num_computed_tokens ==
        num_tokens`) then feed the token that step sampled, still on the device; a sequence that ends
        with that token costs one discarded row."""
        return False

    @abc.abstractmethod
    def free(self, seq: Sequence) -> None:
        """Release `seq`'s slot at once. Its KV may stay as a prefix-cache entry, evictable any time."""

    def clear_prefix_cache(self) -> int:
        """Drop every idle prefix-cache entry; returns the cached tokens dropped (0 without a cache)."""
        return 0

    def speculative_counts(self) -> tuple[tuple[str, int, int], ...]:
        """(guesser, tokens drafted, tokens accepted) since start, per guesser (empty without speculation)."""
        return ()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release native resources."""


def choose_runner(settings: Settings, model: ResolvedModel) -> str:
    """The runner for `model`: `settings.runner`, or by the model's format when it is "auto"."""
    if settings.runner != "auto":
        wanted = settings.runner
        if wanted == "llamacpp" and model.format != "gguf":
            raise ValueError(f"DS_RUNNER=llamacpp needs a GGUF file, but {model.path} is a Hugging Face folder")
        if wanted == "torch" and model.format != "hf":
            raise ValueError(f"DS_RUNNER=torch needs a Hugging Face folder, but {model.path} is a GGUF file")
        return wanted
    return "llamacpp" if model.format == "gguf" else "torch"


def build_runner(settings: Settings, model: ResolvedModel) -> Runner:
    """Load `model` with the runner `choose_runner` picks."""
    cls: type[Runner]
    if choose_runner(settings, model) == "llamacpp":
        from deepseek_serve.engine.runners.llamacpp import LlamaCppRunner

        cls = LlamaCppRunner
    else:
        try:
            from deepseek_serve.engine.runners.pytorch import TorchRunner
        except ImportError as exc:
            raise RuntimeError(f"the PyTorch runner needs `pip install 'deepseek-serve[torch]'` ({exc})") from exc
        cls = TorchRunner
    return cls.from_settings(settings, model.path)
