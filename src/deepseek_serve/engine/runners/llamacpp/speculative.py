"""Speculative decoding in the llama.cpp runner: which decoding sequences carry guesses this step,
and the verification of a sequence's guesses after the step's `llama_decode`.

Guesses ride in the same batch as every other sequence's tokens (`TokenBatch.fill(..., guesses)`),
so speculation and continuous batching mix freely. After the forward pass `verify` draws the target's
tokens row by row (`LogitsSampler.sample_run`), keeps the KV cells of the accepted guesses and removes
the others (`llama_memory_seq_rm` of this sequence id from the first rejected position: guess cells
are never shared with another sequence, unlike prompt cells).

Who speculates: sequences allocated with `SamplingParams.speculative` and no grammar (a grammar
sampler cannot be rolled back over rejected guesses), while at most `max_batch` sequences decode in
the step (beyond that the batch is compute-bound and extra tokens cost what they save). Each
sequence's draft length follows its acceptance (`AdaptiveDraft`), and never runs past its
`max_tokens` or the model's length, so guesses stay inside the sequence's KV reservation.
"""

from __future__ import annotations

from dataclasses import dataclass

import llama_cpp as lc

from deepseek_serve.engine.runners import SampleResult, ScheduledSeq
from deepseek_serve.engine.runners.llamacpp.draft import DraftModel
from deepseek_serve.engine.runners.llamacpp.sampling import LogitsSampler, SequenceSamplers
from deepseek_serve.engine.sequence import Sequence
from deepseek_serve.engine.speculative import AdaptiveDraft, PromptLookup, SpeculativeConfig, SpeculativeCounters

# A guessed token's share of a decode step's cost when verified: the measurement on a 1.5B
# model with 2 threads (4 guesses verified cost about 1.2 plain steps).
VERIFY_COST = 0.05


@dataclass(eq=False)
class _Speculating:
    lookup: PromptLookup | None
    adaptive: AdaptiveDraft


class Speculator:
    """The speculative state of one runner: per sequence id, its guesser state and draft length."""

    def __init__(
        self,
        config: SpeculativeConfig,
        memory: lc.llama_memory_t,
        sampler: LogitsSampler,
        max_model_len: int,
        draft: DraftModel | None = None,
        target_size_bytes: int = 0,
    ) -> None:
        self.config = config
        self.guesser = "draft" if draft is not None else "ngram"
        self.draft = draft
        self._mem = memory
        self._sampler = sampler
        self._max_model_len = max_model_len
        self._cost = VERIFY_COST
        if draft is not None and config.draft_cost > 0:
            self._cost += config.draft_cost
        elif draft is not None and target_size_bytes:
            # decode is bound by reading the weights: a draft token costs about the ratio of the sizes
            self._cost += draft.size_bytes / target_size_bytes
        self._states: dict[int, _Speculating] = {}
        self.counters = SpeculativeCounters()

    def start(self, seq: Sequence) -> None:
        """A sequence got its slot: it speculates unless it opted out or decodes under a grammar."""
        assert seq.slot is not None
        self.stop(seq.slot)
        if not seq.params.speculative or seq.params.grammar is not None:
            return
        c = self.config
        lookup = PromptLookup(c.ngram_min, c.ngram_max) if self.draft is None else None
        self._states[seq.slot] = _Speculating(lookup, AdaptiveDraft(c.max_draft_tokens, self._cost))

    def stop(self, slot: int) -> None:
        """A sequence left its slot. The draft model keeps its KV for that id as long as the target's
        prefix cache keeps the slot's (`SlotPool(on_clear=...)` drops it), so the next turn of a
        conversation catches the draft up from the common prefix only."""
        self._states.pop(slot, None)

    def guesses(self, batch: list[ScheduledSeq], entries: list[int], room: int) -> dict[int, list[int]]:
        """Guesses for the decoding entries among `entries` (indices into `batch`), at most `room`
        tokens in all."""
        decoding = [i for i in entries if batch[i].sample and batch[i].num_new_tokens == 1]
        decoding = [i for i in decoding if not batch[i].seq.is_prefilling]
        if not decoding or len(decoding) > self.config.max_batch or room <= 0:
            return {}
        wanted: list[tuple[int, Sequence, int]] = []
        for i in decoding:
            seq = batch[i].seq
            assert seq.slot is not None
            state = self._states.get(seq.slot)
            if state is None:
                continue
            left = min(seq.max_tokens - seq.num_output_tokens, self._max_model_len - seq.num_tokens) - 1
            k = min(state.adaptive.next_k(), left)
            if k > 0:
                wanted.append((i, seq, k))
        if not wanted:
            return {}
        if self.draft is not None:
            proposed = self.draft.propose([(seq.slot, seq.all_token_ids, k) for _, seq, k in wanted])  # type: ignore[misc]
        else:
            proposed = []
            for _, seq, k in wanted:
                state = self._states[seq.slot]  # type: ignore[index]
                assert state.lookup is not None
                proposed.append(state.lookup.propose(seq.all_token_ids, k))
        out: dict[int, list[int]] = {}
        for (i, _, _), drafts in zip(wanted, proposed, strict=True):
            drafts = drafts[:room]
            if drafts:
                out[i] = drafts
                room -= len(drafts)
        return out

    def verify(
        self, seq: Sequence, samplers: SequenceSamplers, row: int, guesses: list[int], start: int
    ) -> SampleResult:
        """Draw the target's tokens over the rows of `guesses` (fed at positions start+1..), keep the
        KV of the accepted ones, drop the rest; `seq.num_computed_tokens` moves past the accepted."""
        assert seq.slot is not None
        drawn = self._sampler.sample_run(samplers, seq.params, row, guesses, seq.output_token_ids)
        accepted = len(drawn) - 1
        seq.num_computed_tokens += accepted
        if accepted < len(guesses):
            lc.llama_memory_seq_rm(self._mem, seq.slot, start + 1 + accepted, -1)
        state = self._states.get(seq.slot)
        if state is not None:
            state.adaptive.update(len(guesses), accepted)
        self.counters.add(self.guesser, len(guesses), accepted)
        return SampleResult.run(drawn, len(guesses), self.guesser)

    def close(self) -> None:
        if self.draft is not None:
            self.draft.close()
