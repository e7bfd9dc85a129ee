"""Runs sequences through any `Runner` without the engine's scheduler, for runner-level tests and
the torch runner's benchmarks (bench/gpu*.py, bench/torch_cpu.py). Stops on `max_tokens` only
(no EOS / stop strings)."""

from __future__ import annotations

from collections.abc import Callable

from deepseek_serve.engine.runners import LaunchedStep, Runner, ScheduledSeq
from deepseek_serve.engine.sequence import Sequence, SequenceStatus


def run_to_completion(
    runner: Runner,
    seqs: list[Sequence],
    prefill_chunk: int = 512,
    on_step: Callable[[int], None] | None = None,
    overlap: bool = False,
) -> int:
    """Allocate every sequence (all must fit at once), then step until each has `max_tokens` outputs.

    Each step packs every decoding sequence plus one prefill chunk per prefilling sequence.
    `overlap`: as the engine does, launch step N+1 before taking in step N's tokens wherever the
    runner can (`Runner.can_launch_ahead`); the tokens are the same, the host's work per step hides
    behind the device's. Returns the number of steps taken.
    """
    for seq in seqs:
        if not runner.can_allocate(seq):
            raise RuntimeError(f"sequence {seq.request_id} does not fit the runner")
        runner.allocate(seq)
        seq.status = SequenceStatus.RUNNING
    live = list(seqs)
    steps = 0
    in_flight: LaunchedStep | None = None
    while live:
        # a sequence whose last token is in flight is not scheduled again
        waiting = {id(e.seq) for e in in_flight.batch if e.sample} if in_flight is not None else set()
        batch = []
        for seq in live:
            if seq.is_prefilling:
                n = min(prefill_chunk, seq.num_prompt_tokens - seq.num_computed_tokens)
                batch.append(ScheduledSeq(seq, n, seq.num_computed_tokens + n == seq.num_prompt_tokens))
            elif seq.num_output_tokens + (id(seq) in waiting) < seq.max_tokens:
                batch.append(ScheduledSeq(seq, 1, True))
        if in_flight is not None and not (batch and runner.can_launch_ahead(batch)):
            _take(runner, in_flight, live)
            in_flight = None
            continue
        launched = runner.launch(batch) if batch else None
        if in_flight is not None:
            _take(runner, in_flight, live)
            in_flight = None
        if launched is None:
            continue
        steps += 1
        if on_step is not None:
            on_step(steps)
        if overlap and not launched.done:
            in_flight = launched
        else:
            _take(runner, launched, live)
    return steps


def _take(runner: Runner, launched: LaunchedStep, live: list[Sequence]) -> None:
    """Append a step's tokens to its sequences and free the sequences that are done."""
    for entry, res in zip(launched.batch, launched.results(), strict=True):
        if res is not None:  # one token, or several under speculative decoding
            for token, logprob in res.tokens()[: entry.seq.max_tokens - entry.seq.num_output_tokens]:
                entry.seq.output_token_ids.append(token)
                if logprob is not None:
                    entry.seq.output_logprobs.append(logprob)
    for seq in [s for s in live if s.num_output_tokens >= s.max_tokens]:
        seq.status = SequenceStatus.FINISHED
        runner.free(seq)
        live.remove(seq)
