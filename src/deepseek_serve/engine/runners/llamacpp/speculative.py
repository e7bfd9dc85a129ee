"""Speculative decoding in the llama.cpp runner: which decoding sequences carry guesses this step,
and the verification of a sequence's guesses after the step's `llama_decode`.

Guesses ride in the same batch as every other sequence's tokens (`TokenBatch.fill(..., guesses)`),
so speculation and continuous batching mix freely. After the forward pass `verify` draws the target's
tokens row by row (`LogitsSampler.sample_run`), keeps the KV cells of the accepted guesses and removes
the others (`llama_memory_seq_rm` of this sequence id from the first rejected position: guess cells
are never shared with another sequence, unlike prompt cells).

Who speculates: sequences allocated with `SamplingParams.speculative` and no grammar (a grammar
sampler cannot be rolled back over rejected guesses), while at most `max_batch` sequences decode in
the step. How many guesses each carries is planned per step (`plan_draft_lengths`) from what the
machine measures: the wall time of `llama_decode` per batch token count (`StepCost`, seeded at start
by `calibrate` and learnt from every step; with a draft model, the draft's steps too) and each
sequence's acceptance (prior: its guesser's). Guesses never run past a sequence's `max_tokens` or
the model's length, so they stay inside the sequence's KV reservation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import llama_cpp as lc

from deepseek_serve.engine.runners import SampleResult, ScheduledSeq
from deepseek_serve.engine.runners.llamacpp.batch import TokenBatch
from deepseek_serve.engine.runners.llamacpp.draft import DraftModel
from deepseek_serve.engine.runners.llamacpp.sampling import LogitsSampler, SequenceSamplers
from deepseek_serve.engine.sequence import Sequence
from deepseek_serve.engine.speculative import (
    Acceptance,
    DraftOffer,
    PromptLookup,
    SpeculativeConfig,
    SpeculativeCounters,
    StepCost,
    plan_draft_lengths,
)

# batch token counts timed at start: one decoding sequence with up to 8 guesses, up to 8 sequences with 3
CALIBRATION_SIZES = (1, 2, 3, 4, 5, 6, 8, 9, 12, 16, 24, 32)


def calibrate(
    ctx: lc.llama_context_p, batch: TokenBatch, token: int, sizes: Seq[int] = CALIBRATION_SIZES, repeats: int = 2
) -> StepCost:
    """A StepCost seeded with the mean wall time of `repeats` `llama_decode` calls of each size in
    `sizes` (sequence id 0 after a 16-token prefix, removed afterwards: call it before any sequence
    holds cells)."""
    cost = StepCost()
    mem = lc.llama_get_memory(ctx)
    prefix = 16
    _decode(ctx, batch, [token] * prefix, 0)  # also the warm-up
    times: dict[int, list[float]] = {}
    for _ in range(repeats):
        for n in sizes:
            if n > batch.capacity:
                continue
            times.setdefault(n, []).append(_decode(ctx, batch, [token] * n, prefix))
            lc.llama_memory_seq_rm(mem, 0, prefix, -1)
    lc.llama_memory_seq_rm(mem, 0, -1, -1)
    for n, ts in times.items():
        cost.seed(n, sum(ts) / len(ts))
    return cost


def _decode(ctx: lc.llama_context_p, batch: TokenBatch, tokens: list[int], pos: int) -> float:
    batch.write([(tokens, pos, 0)])
    t0 = time.perf_counter()
    rc = lc.llama_decode(ctx, batch.batch)
    lc.llama_synchronize(ctx)
    if rc != 0:
        raise RuntimeError(f"llama_decode failed with code {rc} while timing steps")
    return time.perf_counter() - t0


@dataclass(eq=False)
class _Speculating:
    lookup: PromptLookup | None
    acceptance: Acceptance


class Speculator:
    """The speculative state of one runner: the measured step costs, the guesser's acceptance, and
    per sequence id its guesser state and acceptance."""

    def __init__(
        self,
        config: SpeculativeConfig,
        memory: lc.llama_memory_t,
        sampler: LogitsSampler,
        max_model_len: int,
        draft: DraftModel | None = None,
        step_cost: StepCost | None = None,
    ) -> None:
        self.config = config
        self.guesser = "draft" if draft is not None else "ngram"
        self.draft = draft
        self._mem = memory
        self._sampler = sampler
        self._max_model_len = max_model_len
        self.step_cost = step_cost if step_cost is not None else StepCost()
        self.acceptance = Acceptance.prior(decay=0.95)  # the guesser's, over all sequences: their prior
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
        self._states[seq.slot] = _Speculating(lookup, Acceptance.prior(self.acceptance.alpha))

    def stop(self, slot: int) -> None:
        """A sequence left its slot. The draft model keeps its KV for that id as long as the target's
        prefix cache keeps the slot's (`SlotPool(on_clear=...)` drops it), so the next turn of a
        conversation catches the draft up from the common prefix only."""
        self._states.pop(slot, None)

    def calibrate(self, ctx: lc.llama_context_p, batch: TokenBatch, token: int) -> None:
        """Seed the step costs by timing steps of the target (`ctx`, `batch`) and of the draft model
        (before any sequence holds KV cells)."""
        self.step_cost = calibrate(ctx, batch, token)
        if self.draft is not None:
            self.draft.step_cost = calibrate(self.draft.ctx, self.draft.batch, token, sizes=(1, 2, 3, 4, 6, 8))

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """A target step of `num_tokens` batch tokens took `seconds` (llama_decode alone)."""
        self.step_cost.observe(num_tokens, seconds)

    def guesses(
        self, batch: list[ScheduledSeq], entries: list[int], base_tokens: int, room: int
    ) -> dict[int, list[int]]:
        """Guesses for the decoding entries among `entries` (indices into `batch`) in a step of
        `base_tokens` tokens without them, at most `room` tokens in all."""
        decoding = [i for i in entries if batch[i].sample and batch[i].num_new_tokens == 1]
        decoding = [i for i in decoding if not batch[i].seq.is_prefilling]
        if not decoding or len(decoding) > self.config.max_batch or room <= 0:
            return {}
        offers: list[tuple[int, Sequence, _Speculating, int]] = []
        found: list[list[int]] = []  # prompt lookup: its guesses, found before planning (they are free)
        for i in decoding:
            seq = batch[i].seq
            assert seq.slot is not None
            state = self._states.get(seq.slot)
            if state is None:
                continue
            left = min(seq.max_tokens - seq.num_output_tokens, self._max_model_len - seq.num_tokens) - 1
            k = min(self.config.max_draft_tokens, left, room)
            drafts: list[int] = []
            if state.lookup is not None and k > 0:
                drafts = state.lookup.propose(seq.all_token_ids, k)
                k = len(drafts)
            if k > 0:
                offers.append((i, seq, state, k))
                found.append(drafts)
        if not offers:
            return {}
        if self.config.adaptive:
            ks = plan_draft_lengths(
                [DraftOffer(state.acceptance.planning_alpha(), k) for _, _, state, k in offers],
                base_tokens=base_tokens,
                num_decoding=len(decoding),
                target=self.step_cost,
                draft=self.draft.step_cost if self.draft is not None else None,
            )
            for (_, _, state, _), k in zip(offers, ks, strict=True):
                state.acceptance.planned(k)
        else:
            ks = [k for _, _, _, k in offers]
        if self.draft is not None:
            wanted = [(seq.slot, seq.all_token_ids, k) for (_, seq, _, _), k in zip(offers, ks, strict=True) if k]
            proposed = iter(self.draft.propose(wanted))  # type: ignore[arg-type]
            found = [next(proposed) if k else [] for k in ks]
        out: dict[int, list[int]] = {}
        for (i, _, _, _), k, drafts in zip(offers, ks, found, strict=True):
            drafts = drafts[: min(k, room)]
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
            state.acceptance.update(len(guesses), accepted)
        self.acceptance.update(len(guesses), accepted)
        self.counters.add(self.guesser, len(guesses), accepted)
        return SampleResult.run(drawn, len(guesses), self.guesser)

    def close(self) -> None:
        if self.draft is not None:
            self.draft.close()
