"""Prompt lookup in the torch runner: greedy sequences verify their guesses in a forward of their own.

The decode step stays what it is (one token per row, a captured CUDA graph per rows x KV bucket).
Rows that carry guesses leave it: their last token and k guesses go through one eager multi-token
forward, like a prefill chunk against the slot's cached prefix (`ForwardBatch` with a causal mask
over the last 1 + k positions; rows grouped by 1 + k), and the logits of every position come back.
A guess is kept while it equals the argmax before it (the longest such prefix); the argmax after
the last kept guess is the step's own token. KV is positional per slot, so rejected guesses need no
removal: their cells lie past `num_computed_tokens`, masked until the next steps overwrite them.

Who speculates: plain greedy sequences (`TorchRunner._plain_greedy`, no logit bias) that allow it
(`SamplingParams.speculative`); a sampled row would need the draws of all 1 + k positions from the
seeded sampler, which this module does not do. How many guesses: `plan_draft_lengths` over two
measured costs, the decode step by rows (what a token costs without guesses) and the verify forward
by tokens (what the guesses cost), both seeded by `calibrate` before serving and learnt from the
steps run; `SpeculativeConfig.adaptive=False` takes every guess the lookup finds (up to k).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from deepseek_serve.engine.runners import SampleResult, ScheduledSeq
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

if TYPE_CHECKING:
    from deepseek_serve.config import Settings
    from deepseek_serve.engine.runners.pytorch.runner import TorchRunner


@dataclass(eq=False)
class _Speculating:
    seq: Sequence  # the sequence this state belongs to (a slot outlives its sequences)
    lookup: PromptLookup
    acceptance: Acceptance


class TorchSpeculator:
    """Prompt lookup for one TorchRunner: `step` verifies the rows it plans guesses for and runs the
    rest through the runner's own step."""

    guesser = "ngram"

    @classmethod
    def from_settings(cls, runner: TorchRunner, settings: Settings) -> TorchSpeculator | None:
        """The runner's speculator under `settings.speculative*` (None when off), calibrated when adaptive."""
        config = SpeculativeConfig.from_settings(settings)
        if not config.enabled:
            return None
        speculator = cls(runner, config)
        if config.adaptive:
            speculator.calibrate()
        return speculator

    def __init__(self, runner: TorchRunner, config: SpeculativeConfig) -> None:
        if config.mode != "ngram":
            raise ValueError(
                f"the torch runner speculates with prompt lookup only (DS_SPECULATIVE=ngram), not {config.mode!r}"
            )
        self.runner = runner
        self.config = config
        self.decode_cost = StepCost()  # a step without guesses, by rows
        self.verify_cost = StepCost()  # a verify forward, by tokens (rows + guesses)
        self.acceptance = Acceptance.prior(decay=0.95)
        self.counters = SpeculativeCounters()
        self._states: dict[int, _Speculating] = {}  # by slot

    # --- planning -----------------------------------------------------------------------------------
    def _state(self, seq: Sequence) -> _Speculating:
        assert seq.slot is not None
        state = self._states.get(seq.slot)
        if state is None or state.seq is not seq:
            c = self.config
            state = _Speculating(seq, PromptLookup(c.ngram_min, c.ngram_max), Acceptance.prior(self.acceptance.alpha))
            self._states[seq.slot] = state
        return state

    def _eligible(self, item: ScheduledSeq) -> bool:
        seq = item.seq
        return (
            item.sample
            and item.num_new_tokens == 1
            and not seq.is_prefilling
            and seq.params.speculative
            and self.runner._plain_greedy(seq)
        )

    def plan(self, batch: list[ScheduledSeq], entries: list[int]) -> dict[int, list[int]]:
        """Guesses for the entries (indices into `batch`) that carry some this step."""
        decoding = [i for i in entries if batch[i].num_new_tokens == 1 and not batch[i].seq.is_prefilling]
        if not decoding or len(decoding) > self.config.max_batch:
            return {}
        offers: list[tuple[int, _Speculating, list[int]]] = []
        for i in decoding:
            if not self._eligible(batch[i]):
                continue
            seq = batch[i].seq
            left = min(seq.max_tokens - seq.num_output_tokens, self.runner.max_model_len - seq.num_tokens) - 1
            k = min(self.config.max_draft_tokens, left)
            state = self._state(seq)
            found = state.lookup.propose(seq.all_token_ids, k) if k > 0 else []
            if found:
                offers.append((i, state, found))
        if not offers:
            return {}
        if self.config.adaptive:
            ks = plan_draft_lengths(
                [DraftOffer(state.acceptance.planning_alpha(), len(found)) for _, state, found in offers],
                base_tokens=len(decoding),
                num_decoding=len(decoding),
                target=self.verify_cost,
                plain=self.decode_cost,
            )
            for (_, state, _), k in zip(offers, ks, strict=True):
                state.acceptance.planned(k)
        else:
            ks = [len(found) for _, _, found in offers]
        return {i: found[:k] for (i, _, found), k in zip(offers, ks, strict=True) if k > 0}

    # --- the step -----------------------------------------------------------------------------------
    def step(self, batch: list[ScheduledSeq], entries: list[int], results: list[SampleResult | None]) -> None:
        """Fill `results` for `entries` (indices into `batch`): rows with guesses verified here, the
        others through the runner's step."""
        guesses = self.plan(batch, entries)
        by_len: dict[int, list[int]] = {}
        for i, drafts in guesses.items():
            by_len.setdefault(len(drafts), []).append(i)
        for members in by_len.values():
            for i, result in zip(
                members, self.verify([batch[i] for i in members], [guesses[i] for i in members]), strict=True
            ):
                results[i] = result
        rest = [i for i in entries if i not in guesses]
        if rest:
            t0 = time.perf_counter()
            done = self.runner._step([batch[i] for i in rest])  # ends with the step's device -> host copy
            if all(batch[i].num_new_tokens == 1 for i in rest):
                self.decode_cost.observe(len(rest), time.perf_counter() - t0)
            for i, plain in zip(rest, done, strict=True):
                results[i] = plain

    def verify(self, items: list[ScheduledSeq], guesses: list[list[int]]) -> list[SampleResult]:
        """One forward of each item's last token and its guesses (all of one length k); the greedy
        tokens, `num_computed_tokens` moved past the fed token and the accepted guesses."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = self.forward(
                [[it.seq.token_at(it.seq.num_computed_tokens), *g] for it, g in zip(items, guesses, strict=True)],
                [it.seq.num_computed_tokens for it in items],
                [it.seq.slot for it in items],  # type: ignore[misc]
            )
            greedy = logits.argmax(dim=-1).tolist()  # [B, 1 + k]
        self.verify_cost.observe(len(items) * (1 + len(guesses[0])), time.perf_counter() - t0)
        out = []
        for item, drafts, best in zip(items, guesses, greedy, strict=True):
            accepted = 0
            while accepted < len(drafts) and best[accepted] == drafts[accepted]:
                accepted += 1
            item.seq.num_computed_tokens += 1 + accepted
            state = self._states.get(item.seq.slot)  # type: ignore[arg-type]
            if state is not None:
                state.acceptance.update(len(drafts), accepted)
            self.acceptance.update(len(drafts), accepted)
            self.counters.add(self.guesser, len(drafts), accepted)
            drawn = [SampleResult(t) for t in best[: accepted + 1]]
            out.append(SampleResult.run(drawn, len(drafts), self.guesser))
        return out

    def forward(self, tokens: list[list[int]], starts: list[int], slots: list[int]) -> torch.Tensor:
        """Logits [B, T, V] of rows of T tokens each fed at positions start.. of their slots."""
        runner = self.runner
        t = len(tokens[0])
        tok = torch.tensor(tokens, dtype=torch.int64).to(runner.device)  # [B, T]
        pos = (torch.tensor(starts, dtype=torch.int64)[:, None] + torch.arange(t)[None, :]).to(runner.device)
        fb = runner.masked_batch(torch.tensor(slots, dtype=torch.int64).to(runner.device), pos, max(starts) + t)
        return runner.model(tok, runner.cache, fb, runner.ops)

    # --- costs --------------------------------------------------------------------------------------
    def calibrate(self, repeats: int = 2) -> None:
        """Seed both costs by timing decode steps (every row idle: scratch writes) and verify forwards
        into the lowest slots at positions 0.. (before serving only: it overwrites their KV)."""
        runner = self.runner
        num_slots = runner.slots.num_slots
        decode: dict[int, list[float]] = {}
        verify: dict[int, list[float]] = {}
        with torch.inference_mode():
            for _ in range(repeats + 1):  # the first round warms up, untimed
                rows = 1
                while rows <= min(num_slots, self.config.max_batch):
                    decode.setdefault(rows, []).append(self._time_idle_decode(rows))
                    rows *= 2
                for rows, t in ((1, 2), (1, 3), (1, 5), (1, 9), (min(num_slots, 4), 3), (min(num_slots, 4), 5)):
                    t0 = time.perf_counter()
                    self.forward([[0] * t] * rows, [0] * rows, list(range(rows))).argmax(dim=-1).tolist()
                    verify.setdefault(rows * t, []).append(time.perf_counter() - t0)
        self.decode_cost, self.verify_cost = StepCost(), StepCost()
        for cost, times in ((self.decode_cost, decode), (self.verify_cost, verify)):
            for n, ts in times.items():
                cost.seed(n, sum(ts[1:]) / len(ts[1:]))

    def _time_idle_decode(self, rows: int) -> float:
        runner = self.runner
        scratch = runner.max_model_len  # the scratch column past every slot's positions
        t0 = time.perf_counter()
        if runner.graphs is not None:
            _, greedy = runner.graphs.replay([0] * rows, [0] * rows, [scratch] * rows, runner.kv_bucket(1))
        else:
            host = torch.tensor([[0] * rows, [0] * rows, [scratch] * rows], dtype=torch.int64)
            _, greedy = runner.decode_forward(host.to(runner.device), runner.kv_bucket(1))
        greedy.tolist()
        return time.perf_counter() - t0
