"""Constrained decoding on llguidance, for any runner: one matcher per sequence over the GBNF text that
serving/structured.py and serving/tools.py build (converted to llguidance's Lark dialect).

The runner keeps the sampling; a matcher answers whether one token is allowed (`allows`), which
tokens are (`allowed`, a boolean row over the vocabulary), and follows the tokens the sequence takes
(`accept`). End tokens are the runner's business: the matcher allows them exactly when the text so far
is a complete match. llguidance is a dependency; `require_llguidance` names it when an install lacks it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def require_llguidance(what: str) -> None:
    """Raise ValueError naming `what` when the llguidance package is missing."""
    try:
        import llguidance  # noqa: F401
    except ImportError:
        raise ValueError(f"{what} needs the llguidance package: pip install llguidance") from None


def llguidance_available() -> bool:
    try:
        require_llguidance("constrained decoding")
    except ValueError:
        return False
    return True


class GuidanceMatcher:
    """One sequence's llguidance matcher. `tokenizer` is an `llguidance.LLTokenizer` over the model's
    vocabulary of `n_vocab` entries; `eos_ids` are the tokens that end generation."""

    def __init__(self, tokenizer: Any, grammar: str, n_vocab: int, eos_ids: tuple[int, ...]) -> None:
        import llguidance
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            lark = gbnf_to_lark(grammar)
        except Exception as exc:  # the converter's own error type
            raise ValueError(f"the grammar could not be parsed: {exc}") from None
        self._matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_lark(lark))
        if self._matcher.is_error():
            raise ValueError(f"the grammar could not be parsed: {self._matcher.get_error()}")
        self._n_vocab = n_vocab
        self._eos = frozenset(eos_ids)
        self._bitmask = np.full((n_vocab + 31) // 32, -1, dtype=np.int32)

    def allows(self, token: int) -> bool:
        if token in self._eos:  # validate_tokens never takes an end token; the mask does, at the end
            return bool(self._matcher.is_accepting())
        return bool(self._matcher.validate_tokens([token]) == 1)

    def allowed(self) -> np.ndarray:
        """A boolean row over the vocabulary: True for every token the grammar allows next."""
        bits = self._bitmask
        self._matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        return np.unpackbits(bits.view(np.uint8), bitorder="little")[: self._n_vocab].view(bool)

    def accept(self, token: int) -> None:
        if token in self._eos:
            return  # the sequence ends here
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self._matcher.get_error()}")

    def free(self) -> None:
        pass
