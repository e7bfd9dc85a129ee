"""Incremental detokenization: UTF-8-safe text deltas with stop strings held back."""

from __future__ import annotations

import codecs

from deepseek_serve.engine.runners import Tokenizer


class IncrementalDetokenizer:
    """Turns token ids into text pieces, one call per token.

    - Bytes of a multi-byte character split across tokens are held until the character is complete,
      so no delta ever carries a broken UTF-8 sequence.
    - Text that could be the start of a stop string is held back until it is known not to be one;
      a stop string found ends generation and is not emitted.
    - When generation ends inside a character (max_tokens, a stop, an abort), `flush` drops the
      incomplete bytes instead of emitting U+FFFD for them.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = stop
        self._held = ""  # decoded, not yet emitted: a possible stop-string prefix

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; returns (text safe to emit now, whether a stop string was hit)."""
        text = self._decoder.decode(self._tokenizer.token_bytes(token_id))
        if not self._stop:
            return text, False
        buf = self._held + text
        hit = self._first_stop(buf)
        if hit is not None:
            self._held = ""
            return buf[:hit], True
        keep = self._longest_stop_prefix_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Everything still held (generation ended without a stop string), minus the bytes of a
        character the last token left incomplete (held text never contains a whole stop string)."""
        out = self._held
        self._held = ""
        self._decoder.reset()
        return out

    def _first_stop(self, buf: str) -> int | None:
        """Where the stop string starts that `buf` completes first, character by character (of those
        ending at the same character, the longest), so the cut does not depend on token boundaries."""
        best: tuple[int, int] | None = None  # (end, start)
        for s in self._stop:
            i = buf.find(s)
            if i != -1 and (best is None or (i + len(s), i) < best):
                best = (i + len(s), i)
        return None if best is None else best[1]

    def _longest_stop_prefix_suffix(self, buf: str) -> int:
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best
