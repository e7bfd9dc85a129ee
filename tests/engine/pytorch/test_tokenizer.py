"""HF tokenizer adapter (byte-exact token_bytes) and chat templates of the DeepSeek fixtures rendered by the
engine's sandboxed ChatTemplate exactly as transformers' `apply_chat_template` renders them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from deepseek_serve.engine.chat_template import ChatTemplate
from deepseek_serve.engine.runners.pytorch.tokenizer import HFTokenizer, read_chat_template
from tests.support.engine import is_valid_utf8
from tests.support.torch_models import CODER, R1_15B_NEW, R1_32B_OLD, need_fixtures

TEXTS = [
    "hello world",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "深度求索 DeepSeek 是一家中国公司。",
    "emoji 🤖🚀 and accents: café, naïve — “quotes”",
    "  leading spaces\ttabs\r\nand newlines\n\n",
]
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "写一个快速排序"}],
    [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>x</think>hello"},
        {"role": "user", "content": "again"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
]


@pytest.fixture(scope="module")
def coder() -> HFTokenizer:
    need_fixtures()
    return HFTokenizer(CODER)


def test_token_bytes_reassemble_text_exactly(coder: HFTokenizer) -> None:
    assert coder.byte_level
    for text in TEXTS:
        ids = coder.encode(text, add_special_tokens=False)
        assert b"".join(coder.token_bytes(i) for i in ids) == text.encode("utf-8")
        assert coder.decode(ids) == coder.hf.decode(ids, skip_special_tokens=True) == text


def test_multibyte_characters_split_across_tokens(coder: HFTokenizer) -> None:
    ids = coder.encode("🤖", add_special_tokens=False)
    pieces = [coder.token_bytes(i) for i in ids]
    assert len(ids) > 1 and any(not is_valid_utf8(p) for p in pieces)  # raw bytes, not replacement chars
    assert b"".join(pieces) == "🤖".encode()


def test_special_tokens_and_eos_ids(coder: HFTokenizer) -> None:
    vocab = coder.hf.get_vocab()
    eot, eos, bos = vocab["<|EOT|>"], vocab["<｜end▁of▁sentence｜>"], vocab["<｜begin▁of▁sentence｜>"]
    assert (eot, bos) == (32021, 32013)
    assert set(coder.eos_token_ids) >= {eot, eos}
    assert coder.token_bytes(eot) == coder.token_bytes(bos) == b""
    assert coder.bos_token == "<｜begin▁of▁sentence｜>" and coder.eos_token == "<|EOT|>"
    ids = coder.encode("<｜begin▁of▁sentence｜>hi<|EOT|>", add_special_tokens=False)
    assert ids[0] == bos and ids[-1] == eot
    assert coder.vocab_size == len(coder.hf) and coder.token_bytes(coder.vocab_size + 5) == b""


def test_sentencepiece_style_vocabulary(tmp_path: Path) -> None:
    """A Metaspace + byte-fallback vocabulary (deepseek-llm / Llama-2 style), built here."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "▁hello": 4, "▁world": 5, "!": 6}
    vocab.update({f"<0x{b:02X}>": 7 + b for b in range(256)})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(tmp_path))
    tok = HFTokenizer(tmp_path)
    assert not tok.byte_level
    assert tok.token_bytes(4) == b" hello" and tok.token_bytes(7 + 0xE6) == b"\xe6" and tok.token_bytes(2) == b""
    ids = tok.encode("hello world!é", add_special_tokens=False)
    assert b"".join(tok.token_bytes(i) for i in ids) == " hello world!é".encode()


def _render_both(tokenizer: Any, template: str, messages: list[dict[str, Any]]) -> tuple[str, str]:
    ours = ChatTemplate(template, tokenizer.bos_token, tokenizer.eos_token).render(messages)
    theirs = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    return ours, theirs


@pytest.mark.parametrize("folder", [CODER, R1_32B_OLD, R1_15B_NEW], ids=["coder", "r1-old", "r1-new"])
def test_chat_templates_render_like_transformers(folder: Path, coder: HFTokenizer) -> None:
    """R1-Distill templates are paired with the coder tokenizer (their tokenizer.json is not in the
    fixtures); both families spell BOS as <｜begin▁of▁sentence｜>."""
    template = read_chat_template(folder)
    assert template
    for messages in CONVERSATIONS:
        ours, theirs = _render_both(coder.hf, template, messages)
        assert ours == theirs
        assert ours.startswith("<｜begin▁of▁sentence｜>")
    if folder is R1_15B_NEW:
        assert ChatTemplate(template).prefills_think
        assert theirs.endswith("<｜Assistant｜><think>\n")


def test_chat_template_read_from_checkpoint_folder(tmp_path: Path) -> None:
    need_fixtures()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(CODER / f, tmp_path / f)
    expected = json.loads((CODER / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    assert read_chat_template(tmp_path) == expected
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    assert read_chat_template(tmp_path) == "D"
    cfg.pop("chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    assert read_chat_template(tmp_path) is None
    (tmp_path / "chat_template.jinja").write_text("J", encoding="utf-8")
    assert read_chat_template(tmp_path) == "J"


@pytest.mark.parametrize("folder", [CODER, R1_32B_OLD], ids=["coder", "r1-old"])
def test_pickled_tokenizer_encodes_alike_without_transformers(folder: Path) -> None:
    """The copy an API process gets from the engine process (pickled, no transformers object) gives
    the same ids, special tokens written in text and BOS handling included; unpickling imports
    neither transformers nor torch."""
    import pickle
    import subprocess
    import sys

    need_fixtures()
    tok = HFTokenizer(folder)
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.hf is None
    texts = [*TEXTS, "<|EOT|><｜end▁of▁sentence｜> <think>reason</think>", "<|im_start|>user\nhi<|im_end|>", ""]
    for text in texts:
        for special in (True, False):
            assert copy.encode(text, add_special_tokens=special) == tok.encode(text, add_special_tokens=special), text
    assert (copy.bos_token, copy.eos_token, copy.eos_token_ids) == (tok.bos_token, tok.eos_token, tok.eos_token_ids)
    assert copy.decode(tok.encode(TEXTS[2])) == tok.decode(tok.encode(TEXTS[2]))
    code = (
        "import pickle, sys\n"
        "tok = pickle.loads(sys.stdin.buffer.read())\n"
        "print(tok.encode('hello world'), 'transformers' in sys.modules, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(tok), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.decode().split() == [*str(tok.encode("hello world")).split(), "False", "False"]
