"""`Tokenizer` over a Hugging Face tokenizer folder, with byte-exact `token_bytes`.

Two vocabulary styles are decoded per token without the tokenizer's (context-dependent) decoder:
- byte-level BPE (GPT-2, deepseek-coder, Qwen2, SmolLM2): each character of a token stands for one byte;
- sentencepiece-style (Llama-2, deepseek-llm): "▁" is a space and "<0xNN>" pieces are raw bytes.
Special tokens decode to b""; added non-special tokens (e.g. "<think>") to their UTF-8 text.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from deepseek_serve.engine.runners import Tokenizer

# End-of-turn markers of the chat formats we serve; each one present in a vocabulary ends generation.
END_OF_TURN_TOKENS = ("<|EOT|>", "<|im_end|>", "<｜end▁of▁sentence｜>", "<|end_of_text|>", "<|eot_id|>")
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode map, inverted (unicode char -> byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _is_byte_level(backend_json: dict[str, Any]) -> bool:
    return "ByteLevel" in json.dumps(backend_json.get("decoder")) or "ByteLevel" in json.dumps(
        backend_json.get("pre_tokenizer")
    )


class HFTokenizer(Tokenizer):
    """Wraps `transformers.AutoTokenizer` loaded from a checkpoint folder (offline).

    Pickled (the engine process sends it to its API processes), it travels without the transformers
    object: encoding there goes through the fast tokenizer's own `tokenizers.Tokenizer`, which gives
    the same ids (tests/engine/pytorch/test_tokenizer.py), so an API process imports neither
    transformers nor torch for it."""

    def __init__(self, path: Path | str) -> None:
        from transformers import AutoTokenizer

        self.path = Path(path)
        self.hf: Any = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self._backend: Any = self.hf.backend_tokenizer
        backend = json.loads(self._backend.to_str())
        self.byte_level = _is_byte_level(backend)
        self._bos: str | None = self.hf.bos_token
        self._eos: str | None = self.hf.eos_token
        self._table = self._build_table()
        self._eos_ids = self._find_eos_ids()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "hf": None}

    def _build_table(self) -> list[bytes]:
        hf = self.hf
        special = set(hf.all_special_ids)
        added = {i: t for i, t in hf.added_tokens_decoder.items()}
        pieces = hf.convert_ids_to_tokens(list(range(len(hf))))
        bd = _byte_decoder()
        table: list[bytes] = []
        for i, piece in enumerate(pieces):
            if i in special or piece is None:
                table.append(b"")
            elif i in added:
                table.append(b"" if added[i].special else added[i].content.encode("utf-8"))
            elif self.byte_level:
                table.append(bytes(bd[c] for c in piece) if all(c in bd for c in piece) else piece.encode("utf-8"))
            else:
                m = _BYTE_PIECE.match(piece)
                table.append(bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode("utf-8"))
        return table

    def _find_eos_ids(self) -> tuple[int, ...]:
        ids: list[int] = []
        gen_cfg = self.path / "generation_config.json"
        if gen_cfg.is_file():
            eos = json.loads(gen_cfg.read_text(encoding="utf-8")).get("eos_token_id")
            ids.extend(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.hf.eos_token_id is not None:
            ids.append(self.hf.eos_token_id)
        vocab = self.hf.get_vocab()
        ids.extend(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
        return tuple(dict.fromkeys(int(i) for i in ids if 0 <= int(i) < len(self.hf)))

    @property
    def vocab_size(self) -> int:
        return len(self._table)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    @property
    def bos_token(self) -> str | None:
        return self._bos

    @property
    def eos_token(self) -> str | None:
        return self._eos

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.hf is None:  # unpickled: the backend alone
            return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def token_bytes(self, token_id: int) -> bytes:
        return self._table[token_id] if 0 <= token_id < len(self._table) else b""


def read_chat_template(path: Path) -> str | None:
    """The checkpoint's chat template: `tokenizer_config.json` "chat_template" (a string, or a list of
    named templates of which "default" is taken), else `chat_template.jinja`."""
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.is_file():
        tpl = json.loads(cfg_file.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(tpl, str):
            return tpl
        if isinstance(tpl, list):
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            if named.get("default"):
                return str(named["default"])
    jinja_file = path / "chat_template.jinja"
    return jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else None
