"""Token-mask libraries on the structured-output workload: per-token mask time of llguidance and
xgrammar for bench/structured_schema.py's JSON schema over a GGUF model's vocabulary.

    python3 -m venv /tmp/gvenv && /tmp/gvenv/bin/pip install llguidance xgrammar gguf
    /tmp/gvenv/bin/python bench/grammar_engines.py --model PATH.gguf [--repeats 3]

Run it from a separate environment: neither library is a dependency of the project. The vocabulary
is read from the GGUF file (tokens, types, EOS) with the `gguf` package, byte-level tokens decoded to
bytes, control tokens marked as specials. Each library compiles the schema (no free whitespace,
separators ", " and ": ", the layout llama.cpp's JSON grammars produce), then walks
`structured_schema.document()` spelled in the vocabulary's tokens: at every position it computes the
mask of the whole vocabulary (timed) and accepts the next token. One thread, as the engine's sampler
runs. The same walk with llama.cpp's grammar sampler is `bench/structured.py --mask-only`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np

from structured_schema import SCHEMA, GreedySpeller, document

CONTROL, USER_DEFINED = 3, 4  # GGUF token types


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character that stands for each byte."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = visible[:]
    extra = 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(visible, chars, strict=True)}


def load_vocab(path: Path) -> tuple[list[bytes], list[bool], int, int]:
    """(token bytes, is-special per token, EOS id, vocabulary size incl. padding) of a GGUF model."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(name: str) -> object:
        f = reader.fields[name]
        return f.contents()

    texts = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    eos = int(field("tokenizer.ggml.eos_token_id"))  # type: ignore[call-overload]
    model = str(field("tokenizer.ggml.model"))
    assert isinstance(texts, list) and isinstance(types, list)
    n_vocab = len(texts)
    for key in ("qwen2.vocab_size", "llama.vocab_size"):
        if key in reader.fields:
            n_vocab = max(n_vocab, int(field(key)))  # type: ignore[call-overload]
    for t in reader.tensors:  # the embedding's rows: the vocabulary the logits cover
        if t.name == "token_embd.weight":
            n_vocab = max(n_vocab, int(t.shape[-1]))
    decoder = _byte_decoder()
    tokens, special = [], []
    for text, kind in zip(texts, types, strict=True):
        is_special = kind == CONTROL or (kind == USER_DEFINED and text.startswith("<") and text.endswith(">"))
        if is_special:
            tokens.append(b"\xff" + text.encode())
        elif model == "gpt2" and kind != USER_DEFINED:
            tokens.append(bytes(decoder[c] for c in text))
        else:
            tokens.append(text.encode())
        special.append(is_special)
    return tokens, special, eos, n_vocab


def walk(name: str, compute: Callable[[], None], accept: Callable[[int], None], ids: list[int]) -> list[float]:
    """Seconds of `compute` (the whole vocabulary's mask) at each position of `ids`, accepting each id."""
    times = []
    for token in ids:
        t0 = time.perf_counter()
        compute()
        times.append(time.perf_counter() - t0)
        accept(token)
    compute()  # after the last token: the end (EOS) must be allowed
    return times


def run_llguidance(
    tokens: list[bytes], eos: int, n_vocab: int, ids: list[int], grammar: str | None = None
) -> tuple[float, list[float]]:
    import llguidance
    import llguidance.numpy as lln

    class Vocab:
        eos_token_id = eos
        bos_token_id = None

        def __init__(self) -> None:
            self.special_token_ids = [i for i, t in enumerate(tokens) if t.startswith(b"\xff")]
            self.tokens = tokens + [b""] * (n_vocab - len(tokens))
            self.speller = GreedySpeller(tokens)

        def __call__(self, text: bytes) -> list[int]:
            # llguidance tokenizes the text a grammar forces; the model's own tokenizer does it in
            # native code, so this one is kept cheap (a prebuilt index)
            return self.speller(text)

    t0 = time.perf_counter()
    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocab()), n_vocab=n_vocab)
    tokenizer_s = time.perf_counter() - t0
    if grammar is None:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(SCHEMA), defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        )
    t0 = time.perf_counter()
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    compile_s = time.perf_counter() - t0
    if matcher.is_error():
        raise RuntimeError(matcher.get_error())
    mask = lln.allocate_token_bitmask(1, n_vocab)

    def accept(token: int) -> None:
        if not matcher.consume_token(token):
            raise RuntimeError(f"llguidance refused token {token} {tokens[token]!r}: {matcher.get_error()}")

    times = walk("llguidance", lambda: lln.fill_next_token_bitmask(matcher, mask), accept, ids)
    if not (mask[0, eos // 32] >> (eos % 32)) & 1:
        raise RuntimeError("llguidance: EOS not allowed at the end of the document")
    print(f"llguidance {version('llguidance')}: tokenizer {tokenizer_s:.2f} s, grammar {compile_s * 1000:.1f} ms")
    return compile_s, times


def run_llguidance_gbnf(
    tokens: list[bytes], eos: int, n_vocab: int, ids: list[int], gbnf: str
) -> tuple[float, list[float]]:
    """llguidance on the GBNF the server builds (converted to Lark): what DS_GRAMMAR_ENGINE=llguidance runs."""
    import llguidance
    from llguidance.gbnf_to_lark import gbnf_to_lark

    lark = gbnf_to_lark(gbnf)
    return run_llguidance(tokens, eos, n_vocab, ids, llguidance.LLMatcher.grammar_from_lark(lark))


def run_xgrammar(tokens: list[bytes], eos: int, n_vocab: int, ids: list[int]) -> tuple[float, list[float]]:
    import xgrammar as xgr

    vocab = [t if not t.startswith(b"\xff") else t[1:] for t in tokens]
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=n_vocab, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": "))
    compile_s = time.perf_counter() - t0
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, n_vocab)

    def accept(token: int) -> None:
        if not matcher.accept_token(token):
            raise RuntimeError(f"xgrammar refused token {token} {tokens[token]!r}")

    times = walk("xgrammar", lambda: matcher.fill_next_token_bitmask(mask), accept, ids)
    bits = mask.numpy() if hasattr(mask, "numpy") else np.asarray(mask)
    if not (int(bits[0, eos // 32]) >> (eos % 32)) & 1:
        raise RuntimeError("xgrammar: EOS not allowed at the end of the document")
    print(f"xgrammar {version('xgrammar')}: grammar {compile_s * 1000:.1f} ms")
    return compile_s, times


def apply_cost(n_vocab: int, repeats: int = 200) -> list[float]:
    """Seconds to apply a 32-bit-word token bitmask (the shape both libraries fill) to one float32
    logits row with numpy: what a runner adds per token on top of computing the mask."""
    rng = np.random.default_rng(0)
    mask = rng.integers(-(2**31), 2**31, size=(n_vocab + 31) // 32, dtype=np.int64).astype(np.int32)
    times = []
    for _ in range(repeats):
        logits = rng.standard_normal(n_vocab).astype(np.float32)
        t0 = time.perf_counter()
        allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[:n_vocab].view(bool)
        np.copyto(logits, -np.inf, where=~allowed)
        times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    p90 = ms[int(0.9 * (len(ms) - 1))]
    return f"{statistics.median(ms):.3f} | {statistics.fmean(ms):.3f} | {p90:.3f} | {ms[-1]:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="GGUF file whose vocabulary is used")
    ap.add_argument("--repeats", type=int, default=3, help="walks per library; each row is the best walk's figures")
    ap.add_argument("--engines", default="llguidance,xgrammar")
    ap.add_argument(
        "--gbnf",
        default="",
        help="also walk llguidance on this GBNF file (converted to Lark), the server's own grammar: "
        "`.venv/bin/python bench/structured.py --print-grammar > schema.gbnf`",
    )
    args = ap.parse_args()
    tokens, _, eos, n_vocab = load_vocab(Path(args.model))
    ids = GreedySpeller(tokens)(document().encode())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(
        f"machine: {platform.processor() or platform.machine()}; commit {commit}; model {Path(args.model).name}; "
        f"vocabulary {n_vocab} ({len(tokens)} tokens in the file); document {len(ids)} tokens"
    )
    runners: dict[str, Callable[[list[bytes], int, int, list[int]], tuple[float, list[float]]]] = {
        "llguidance": run_llguidance,
        "xgrammar": run_xgrammar,
    }
    engines = args.engines.split(",")
    if args.gbnf:
        gbnf = Path(args.gbnf).read_text()
        runners["llguidance on the server's GBNF"] = lambda *a: run_llguidance_gbnf(*a, gbnf)
        engines.append("llguidance on the server's GBNF")
    rows = []
    for name in engines:
        walks = [runners[name](tokens, eos, n_vocab, ids) for _ in range(args.repeats)]
        best = min(walks, key=lambda w: statistics.median(w[1]))
        rows.append((name, best[0], best[1]))
    print("\n| library | grammar compile ms | mask ms per token: median | mean | p90 | max |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, compile_s, times in rows:
        print(f"| {name} | {compile_s * 1000:.1f} | {summary(times)} |")
    print(f"| apply a bitmask to the logits row (numpy) | | {summary(apply_cost(n_vocab))} |")


if __name__ == "__main__":
    main()
