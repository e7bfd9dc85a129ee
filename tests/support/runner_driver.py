"""Runs sequences through any `Runner` without the engine's scheduler, for runner-level tests and
the torch runner's benchmarks (bench/gpu*.py, bench/torch_cpu.py). Stops on `max_tokens` only
(no EOS / stop strings)."""

from __future__ import annotations

from collections.abc import Callable

from deepseek_serve.engine.runners import Runner, ScheduledSeq
from deepseek_serve.engine.sequence import Sequence, SequenceStatus


def run_to_completion(
    runner: Runner,
    seqs: list[Sequence],
    prefill_chunk: int = 512,
    on_step: Callable[[int], None] | None = None,
) -> int:
    """Allocate every sequence (all must fit at once), then step until each has `max_tokens` outputs.

    Each step packs every decoding sequence plus one prefill chunk per prefilling sequence.
    Returns the number of steps taken.
    """
    for seq in seqs:
        if not runner.can_allocate(seq):
            raise RuntimeError(f"sequence {seq.request_id} does not fit the runner")
        runner.allocate(seq)
        seq.status = SequenceStatus.RUNNING
    live = list(seqs)
    steps = 0
    while live:
        batch = []
        for seq in live:
            if seq.is_prefilling:
                n = min(prefill_chunk, seq.num_prompt_tokens - seq.num_computed_tokens)
                batch.append(ScheduledSeq(seq, n, seq.num_computed_tokens + n == seq.num_prompt_tokens))
            else:
                batch.append(ScheduledSeq(seq, 1, True))
        results = runner.step(batch)
        steps += 1
        if on_step is not None:
            on_step(steps)
        for entry, res in zip(batch, results, strict=True):
            if res is not None:  # one token, or several under speculative decoding
                for token, logprob in res.tokens()[: entry.seq.max_tokens - entry.seq.num_output_tokens]:
                    entry.seq.output_token_ids.append(token)
                    if logprob is not None:
                        entry.seq.output_logprobs.append(logprob)
        for seq in [s for s in live if s.num_output_tokens >= s.max_tokens]:
            seq.status = SequenceStatus.FINISHED
            runner.free(seq)
            live.remove(seq)
    return steps
