"""Property tests (hypothesis) for the text paths that see arbitrary model output: the SSE framing of
live and cached streams, the incremental detokenizer and its stop-string matcher, and the `<think>`
splitter, over arbitrary Unicode and arbitrary byte/token splits.

Pure functions, so nothing here needs the model: the detokenizer gets a table tokenizer whose "tokens"
are arbitrary byte pieces (a real BPE vocabulary splits UTF-8 characters across tokens the same way).
"""

from __future__ import annotations

import json

import orjson
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from deepseek_serve.bench.sse import SSEParser
from deepseek_serve.engine.detokenizer import IncrementalDetokenizer
from deepseek_serve.engine.runners import Tokenizer
from deepseek_serve.serving.reasoning import ReasoningSplitter
from deepseek_serve.serving.schemas import ChatChunkChoice, ChatCompletionChunk, ChatDelta
from deepseek_serve.serving.sse import DONE, model_event, sse_event

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Characters that trip line-based readers or JSON encoders, mixed into the generated text so that
# hypothesis meets them often: every Unicode line break, NUL and other C0/C1 controls, BOM, the
# replacement character, astral characters (4 UTF-8 bytes), combining marks.
_SPECIAL = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x00\x1f\x7f\x9f\ufeff\ufffd\U0001f600\U00010000\u0301:"
unicode_text = st.text(st.one_of(st.characters(codec="utf-8"), st.sampled_from(_SPECIAL)), max_size=60)
# a small alphabet makes stop strings, and stop strings inside stop strings, actually occur
small_text = st.text(st.sampled_from("ab\u00e9\u20ac\U0001f600"), max_size=24)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (taken modulo len+1, sorted, duplicates allowed)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


# --- SSE framing ----------------------------------------------------------------------------------------


def chunk(text: str) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id="chatcmpl-x", created=0, model=text[:8], choices=[ChatChunkChoice(index=0, delta=ChatDelta(content=text))]
    )


def content_of(data: str) -> str:
    content = json.loads(data)["choices"][0]["delta"]["content"]
    assert isinstance(content, str)
    return content


@PROPS
@given(texts=st.lists(unicode_text, min_size=1, max_size=5))
def test_sse_event_is_one_line_for_splitlines_readers(texts: list[str]) -> None:
    """Readers that split lines like str.splitlines (httpx's iter_lines) see one `data:` line per event
    and the JSON in it gives back the text exactly."""
    stream = b"".join(model_event(chunk(t)) for t in texts) + DONE
    lines = stream.decode("utf-8").splitlines()
    data_lines = [line for line in lines if line]
    assert len(data_lines) == len(texts) + 1
    assert all(line.startswith("data: ") for line in data_lines)
    assert [content_of(line[len("data: ") :]) for line in data_lines[:-1]] == texts
    assert data_lines[-1] == "data: [DONE]"
    # every event ends with the blank line that dispatches it
    assert lines == [x for line in data_lines for x in (line, "")]


@PROPS
@given(texts=st.lists(unicode_text, min_size=1, max_size=5), cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_sse_stream_survives_any_byte_split(texts: list[str], cuts: list[int]) -> None:
    """A WHATWG event-stream reader fed the stream in arbitrary pieces (split inside UTF-8 characters,
    between CR and LF...) gets every event whole."""
    stream = b"".join(model_event(chunk(t)) for t in texts) + DONE
    parser = SSEParser()
    events = [e for piece in split_at(stream, cuts) for e in parser.feed(piece)]
    assert [e.data for e in events][-1] == "[DONE]"
    assert [content_of(e.data) for e in events[:-1]] == texts


@PROPS
@given(message=unicode_text)
def test_sse_error_event_round_trips(message: str) -> None:
    """The error event a stream ends with (orjson-encoded body) frames like a model event."""
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    event = sse_event(orjson.dumps(body))
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    lines = event.decode("utf-8").splitlines()
    assert lines == [lines[0], ""]
    assert json.loads(lines[0][len("data: ") :]) == body


# --- incremental detokenizer and stop strings ------------------------------------------------------------


class PieceTokenizer(Tokenizer):
    """Token i is the i-th byte piece given."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return ()

    @property
    def bos_token(self) -> str | None:
        return None

    @property
    def eos_token(self) -> str | None:
        return None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        return self.pieces[token_id]


def detokenize(pieces: list[bytes], stop: tuple[str, ...]) -> tuple[list[str], bool]:
    """What the engine does with one sequence: push every token until a stop hit, else flush."""
    detok = IncrementalDetokenizer(PieceTokenizer(pieces), stop)
    deltas: list[str] = []
    for token_id in range(len(pieces)):
        text, hit = detok.push(token_id)
        deltas.append(text)
        if hit:
            return deltas, True
    deltas.append(detok.flush())
    return deltas, False


def reference(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """The completion as text: generation ends at the first character that completes a stop string
    (of several stop strings ending there, the longest); the stop string is not part of the output."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stop if text[:end].endswith(s)]
        if hits:
            return text[: end - max(len(s) for s in hits)], True
    return text, False


@PROPS
@given(text=unicode_text, cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_detokenizer_without_stop_is_lossless_and_never_splits_a_character(text: str, cuts: list[int]) -> None:
    pieces = split_at(text.encode("utf-8"), cuts)
    deltas, hit = detokenize(pieces, ())
    assert not hit
    assert "".join(deltas) == text
    emitted = ""
    for delta in deltas:
        emitted += delta
        assert text.startswith(emitted)  # never a replacement character for a character cut in two


@PROPS
@given(data=st.binary(max_size=40), cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_detokenizer_on_invalid_utf8_matches_one_shot_decode(data: bytes, cuts: list[int]) -> None:
    """Invalid bytes become U+FFFD as in a one-shot decode; only a character left unfinished at the
    end (one U+FFFD there) is dropped."""
    out = "".join(detokenize(split_at(data, cuts), ())[0])
    full = data.decode("utf-8", errors="replace")
    assert full.startswith(out)
    assert full[len(out) :] in ("", "\ufffd")


@PROPS
@given(
    text=small_text,
    stop=st.lists(small_text.filter(bool), min_size=1, max_size=4).map(tuple),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
)
def test_stop_strings_cut_where_the_text_first_completes_one(text: str, stop: tuple[str, ...], cuts: list[int]) -> None:
    """The output and whether a stop string was hit depend on the text alone, not on how it was cut
    into tokens; nothing of a stop string is ever emitted."""
    deltas, hit = detokenize(split_at(text.encode("utf-8"), cuts), stop)
    assert ("".join(deltas), hit) == reference(text, stop)


@PROPS
@given(
    text=unicode_text,
    stop=st.lists(unicode_text.filter(bool), min_size=1, max_size=4).map(tuple),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
    data=st.data(),
)
def test_stop_strings_over_arbitrary_unicode(
    text: str, stop: tuple[str, ...], cuts: list[int], data: st.DataObject
) -> None:
    # plant one of the stop strings somewhere in the text half of the time
    if data.draw(st.booleans()):
        at = data.draw(st.integers(0, len(text)))
        text = text[:at] + data.draw(st.sampled_from(stop)) + text[at:]
    deltas, hit = detokenize(split_at(text.encode("utf-8"), cuts), stop)
    assert ("".join(deltas), hit) == reference(text, stop)


@PROPS
@given(
    text=small_text,
    stop=st.lists(small_text.filter(bool), min_size=1, max_size=3).map(tuple),
    cut=st.integers(0, 10_000),
)
def test_an_unfinished_last_character_is_dropped(text: str, stop: tuple[str, ...], cut: int) -> None:
    """Generation that ends inside a character (max_tokens) emits the text before it, with its stop
    strings applied, and no U+FFFD."""
    raw = text.encode("utf-8") + "\u20ac".encode()[:2]
    deltas, _ = detokenize(split_at(raw, [cut]), stop)
    assert "".join(deltas) == reference(text, stop)[0]


# --- <think> splitter -------------------------------------------------------------------------------------


@PROPS
@given(
    reasoning=st.text(st.sampled_from("<>/think \n\u00e9"), max_size=30),
    answer=st.text(st.sampled_from("<>/think \n\u00e9"), max_size=30),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    prefilled=st.booleans(),
)
def test_think_splitter_is_independent_of_delta_boundaries(
    reasoning: str, answer: str, cuts: list[int], prefilled: bool
) -> None:
    """However the output is cut into deltas, the splitter produces what it produces for the whole
    output in one piece, and never loses or invents text."""
    assume("</think>" not in reasoning)
    output = ("" if prefilled else "<think>") + reasoning + "</think>" + answer

    def run(deltas: list[str]) -> tuple[str, str]:
        splitter = ReasoningSplitter(prefilled=prefilled)
        parts = [splitter.push(d) for d in deltas] + [splitter.flush()]
        return "".join(p.reasoning for p in parts), "".join(p.content for p in parts)

    whole = run([output])
    points = sorted({c % (len(output) + 1) for c in cuts})
    pieces = [output[a:b] for a, b in zip([0, *points], [*points, len(output)], strict=True)]
    assert run(pieces) == whole
    assert whole[0] == reasoning.lstrip("\n")
    assert whole[1] == answer.lstrip()
