"""Iteration-level scheduling: which sequences run in the next forward step, and with how many tokens.

Between two steps, waiting sequences join the running batch (FCFS, bounded by free slots and
KV capacity) and finished ones leave it. Each step gives every decoding sequence one token and
spends the rest of the token budget on prompt chunks (chunked prefill), so a long prompt never
stalls the others for more than one chunk. A step holds at most `prefill_chunk_tokens` tokens
(decode rows and prompt chunks); while streams decode, one prompt's chunk is also capped so that it
and the decode rows stay within `long_prefill_tokens` (`prompt_chunk_cap`): a long prompt then
costs the decoding streams a bounded step time per chunk, while a burst of short prompts is still
prefilled in full-size steps (the first token of each comes sooner).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from deepseek_serve.engine.errors import QueueFullError
from deepseek_serve.engine.runners import Runner, ScheduledSeq
from deepseek_serve.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


def prompt_chunk_cap(decoding: int, prefill_chunk_tokens: int, long_prefill_tokens: int) -> int:
    """The most prompt tokens one sequence may take in a step beside `decoding` decode rows: the whole
    chunk when nothing decodes; otherwise what is left of `long_prefill_tokens` (at most the chunk)
    after the decode rows, never less than a quarter of it, so a prompt still moves when the batch is
    full of decoding streams."""
    if decoding == 0:
        return prefill_chunk_tokens
    step = min(long_prefill_tokens, prefill_chunk_tokens)
    return max(step - decoding, step // 4, 1)


class Scheduler:
    def __init__(
        self,
        runner: Runner,
        max_batch_size: int,
        max_queue_size: int,
        prefill_chunk_tokens: int,
        long_prefill_tokens: int | None = None,
    ) -> None:
        self.runner = runner
        self.max_batch_size = min(max_batch_size, runner.max_num_seqs)
        self.max_queue_size = max_queue_size
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.long_prefill_tokens = prefill_chunk_tokens if long_prefill_tokens is None else long_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._lock = threading.Lock()  # guards `waiting` against submissions from the event loop

    # --- called from the event loop thread -----------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Enqueue; raises QueueFullError when the batch and the queue are both full."""
        with self._lock:
            in_system = len(self.running) + len(self.waiting)
            if in_system >= self.max_batch_size + self.max_queue_size:
                raise QueueFullError(len(self.waiting), retry_after_s=self._retry_after())
            self.waiting.append(seq)

    def _retry_after(self) -> float:
        # a coarse hint: roughly how long until a running sequence frees its slot.
        return max(1.0, min(30.0, float(len(self.waiting) // max(self.max_batch_size, 1) + 1)))

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # --- called from the engine thread -----------------------------------------------------------------
    def remove_waiting(self, predicate: object) -> list[Sequence]:
        """Remove and return waiting sequences for which predicate(seq) is true."""
        assert callable(predicate)
        with self._lock:
            removed = [s for s in self.waiting if predicate(s)]
            if removed:
                self.waiting = deque(s for s in self.waiting if not predicate(s))
        return removed

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into the batch while slots and KV allow (FCFS, no overtaking).
        A sequence the runner fails to allocate comes back FINISHED with `error` set, not running."""
        admitted: list[Sequence] = []
        now = time.monotonic()
        while len(self.running) < self.max_batch_size:
            with self._lock:
                if not self.waiting:
                    break
                seq = self.waiting[0]
                if not self.runner.can_allocate(seq):
                    break
                self.waiting.popleft()
                # under the lock, so `add` counts the sequence in one of the two lists at every moment
                self.running.append(seq)
            try:
                self.runner.allocate(seq)
            except Exception as exc:  # this request alone (e.g. its sampler could not be built)
                logger.exception("could not allocate %s", seq.request_id)
                with self._lock:
                    self.running.remove(seq)
                seq.status = SequenceStatus.FINISHED
                seq.error = f"allocation failed: {exc}"
                admitted.append(seq)
                continue
            seq.status = SequenceStatus.RUNNING
            seq.first_scheduled_time = now
            admitted.append(seq)
        return admitted

    def schedule(self) -> list[ScheduledSeq]:
        """The next step's batch: one token per decoding sequence, prompt chunks with what is left."""
        # decode first: latency of running streams comes before throughput of new prompts
        batch = [ScheduledSeq(seq, 1, True) for seq in self.running if not seq.is_prefilling]
        budget = max(self.prefill_chunk_tokens, len(self.running)) - len(batch)
        cap = prompt_chunk_cap(len(batch), self.prefill_chunk_tokens, self.long_prefill_tokens)
        for seq in self.running:
            if seq.is_prefilling and budget > 0:
                remaining = seq.num_prompt_tokens - seq.num_computed_tokens
                n = min(remaining, budget, cap)
                batch.append(ScheduledSeq(seq, n, n == remaining))
                budget -= n
        return batch

    def finish(self, seq: Sequence) -> None:
        """Take a running sequence out of the batch and free its KV slot at once."""
        if seq in self.running:
            self.running.remove(seq)
            self.runner.free(seq)
        seq.status = SequenceStatus.FINISHED
