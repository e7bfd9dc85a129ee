"""The llama_batch one step writes its tokens into, with prompt prefixes shared between sequences."""

from __future__ import annotations

import llama_cpp as lc
import numpy as np

from deepseek_serve.engine.runners import ScheduledSeq
from deepseek_serve.engine.runners.common import common_prefix_len


class TokenBatch:
    """A llama_batch of up to `capacity` tokens for up to `n_seq_max` sequence ids per token, written
    through numpy views of its arrays."""

    def __init__(self, capacity: int, n_seq_max: int) -> None:
        self.capacity = capacity
        self.batch = lc.llama_batch_init(capacity, 0, n_seq_max)
        self._token = np.ctypeslib.as_array(self.batch.token, shape=(capacity,))
        self._pos = np.ctypeslib.as_array(self.batch.pos, shape=(capacity,))
        self._nseq = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(capacity,))
        self._logits = np.ctypeslib.as_array(self.batch.logits, shape=(capacity,))
        self._seq = [self.batch.seq_id[i] for i in range(capacity)]

    def fill(self, batch: list[ScheduledSeq], guesses: dict[int, list[int]] | None = None) -> list[int]:
        """Write the step's tokens (sets the batch's token count); returns the logits row of each item.

        `guesses` maps a decoding item's index to draft tokens (speculative decoding): they follow its
        last token at the next positions, and every one of them gets logits too; the item's row is then
        the first of its 1 + len(guesses) consecutive rows.

        Prompt chunks that start at the same position after identical earlier tokens and begin with the
        same tokens are written once for all of them: each shared token carries every such sequence's
        id, so llama.cpp computes it once and stores one KV cell tagged with all of them (as `seq_cp`
        tags copied cells). Requests that arrive together with one system prompt prefill it once.
        """
        n = 0
        out_index = [0] * len(batch)
        groups: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = {}
        for i, item in enumerate(batch):
            seq = item.seq
            assert seq.slot is not None, "step() on an unallocated sequence"
            start = seq.num_computed_tokens
            k = item.num_new_tokens
            if k == 1 and start >= seq.num_prompt_tokens:  # decode: the last output token
                last = seq.output_token_ids[start - seq.num_prompt_tokens]
                drafts = guesses.get(i) if guesses else None
                if drafts:
                    out_index[i] = n
                    n = self._put(n, (last, *drafts), start, (seq.slot,))
                    self._logits[out_index[i] : n] = 1
                else:
                    n = self._put(n, (last,), start, (seq.slot,))
                    out_index[i] = n - 1
            elif start + k <= seq.num_prompt_tokens:
                prompt = seq.prompt_token_ids
                key = (start, *prompt[: start + 1])
                groups.setdefault(key, []).append((i, seq.slot, prompt[start : start + k]))
            else:
                n = self._put(n, seq.all_token_ids[start : start + k], start, (seq.slot,))
                out_index[i] = n - 1
        for key, members in groups.items():
            n = self._put_shared(n, members, key[0], out_index)
        for i, item in enumerate(batch):
            if item.sample:
                self._logits[out_index[i]] = 1
        assert n <= self.capacity, f"batch of {n} tokens exceeds n_batch {self.capacity}"
        self.batch.n_tokens = n
        return out_index

    def write(self, rows: list[tuple[list[int], int, int]]) -> list[int]:
        """Write whole runs (tokens, first position, sequence id), each with logits at its last token
        only (the draft model's steps); returns each run's logits row."""
        n = 0
        last_rows = []
        for tokens, pos, seq_id in rows:
            n = self._put(n, tokens, pos, (seq_id,))
            self._logits[n - 1] = 1
            last_rows.append(n - 1)
        self.batch.n_tokens = n
        return last_rows

    @property
    def num_tokens(self) -> int:
        return int(self.batch.n_tokens)

    def _put(self, n: int, tokens: list[int] | tuple[int, ...], pos: int, slots: list[int] | tuple[int, ...]) -> int:
        """Write `tokens` at positions pos.. for the sequence ids `slots` from batch row n; returns the next row."""
        k = len(tokens)
        assert n + k <= self.capacity, f"batch of {n + k} tokens exceeds n_batch {self.capacity}"
        self._token[n : n + k] = tokens
        self._pos[n : n + k] = np.arange(pos, pos + k)
        self._logits[n : n + k] = 0
        self._nseq[n : n + k] = len(slots)
        for row in range(n, n + k):
            ids = self._seq[row]
            for j, slot in enumerate(slots):
                ids[j] = slot
        return n + k

    def _put_shared(self, n: int, members: list[tuple[int, int, list[int]]], start: int, out_index: list[int]) -> int:
        """Write prompt chunks (batch item, slot, tokens) that start at `start` after identical histories,
        each run of tokens common to several of them once."""
        stack = [(members, 0)]  # members whose chunks agree on [0, depth), which is written already
        while stack:
            group, depth = stack.pop()
            first = group[0][2]
            run = len(first) - depth
            for _, _, chunk in group[1:]:
                run = min(run, common_prefix_len(first[depth : depth + run], chunk[depth : depth + run]))
            if run:
                n = self._put(n, first[depth : depth + run], start + depth, [slot for _, slot, _ in group])
                depth += run
            rest: dict[int, list[tuple[int, int, list[int]]]] = {}
            for member in group:
                if len(member[2]) == depth:
                    out_index[member[0]] = n - 1
                else:
                    rest.setdefault(member[2][depth], []).append(member)
            stack.extend((g, depth) for g in rest.values())
        return n

    def free(self) -> None:
        lc.llama_batch_free(self.batch)
