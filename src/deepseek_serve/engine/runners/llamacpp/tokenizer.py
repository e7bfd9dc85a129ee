"""`Tokenizer` over a loaded llama.cpp model's vocabulary."""

from __future__ import annotations

import ctypes

import llama_cpp as lc

from deepseek_serve.engine.runners import Tokenizer


class LlamaCppTokenizer(Tokenizer):
    def __init__(self, model: lc.llama_model_p) -> None:
        self.vocab = lc.llama_model_get_vocab(model)
        self._vocab = self.vocab
        self._n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self._bytes: list[bytes | None] = [None] * self._n_vocab
        self._add_bos = bool(lc.llama_vocab_get_add_bos(self._vocab))
        eog = [t for t in range(self._n_vocab) if lc.llama_vocab_is_eog(self._vocab, t)]
        self._eos_ids = tuple(eog)
        self._bos_id = lc.llama_vocab_bos(self._vocab)
        self._eos_id = lc.llama_vocab_eos(self._vocab)
        self._buf = ctypes.create_string_buffer(256)

    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    @property
    def bos_token(self) -> str | None:
        return self._special_text(self._bos_id)

    @property
    def eos_token(self) -> str | None:
        return self._special_text(self._eos_id)

    def _special_text(self, token: int) -> str | None:
        if not 0 <= token < self._n_vocab:
            return None
        return self._piece(token, special=True).decode("utf-8", "replace")

    def _piece(self, token: int, special: bool) -> bytes:
        n = lc.llama_token_to_piece(self._vocab, token, self._buf, len(self._buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
            return buf.raw[:n]
        return self._buf.raw[:n]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        out = (lc.llama_token * n_max)()
        n = lc.llama_tokenize(self._vocab, data, len(data), out, n_max, add_special_tokens, True)
        if n < 0:
            out = (lc.llama_token * -n)()
            n = lc.llama_tokenize(self._vocab, data, len(data), out, -n, add_special_tokens, True)
        return list(out[:n])

    def _check(self, token_id: int) -> None:
        # llama.cpp throws std::out_of_range for an id outside the vocabulary, which aborts the process
        if not 0 <= token_id < self._n_vocab:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self._n_vocab})")

    def token_bytes(self, token_id: int) -> bytes:
        self._check(token_id)
        b = self._bytes[token_id]
        if b is None:
            b = self._piece(token_id, special=False)
            self._bytes[token_id] = b
        return b

    def token_text(self, token_id: int) -> str:
        self._check(token_id)
        return self._piece(token_id, special=True).decode("utf-8", "replace")
