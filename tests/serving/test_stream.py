"""A stream that falls behind the engine: the deltas of several steps go out merged, nothing lost
(the real engine, SmolLM2)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from deepseek_serve.contracts import Principal
from deepseek_serve.engine.async_engine import AsyncEngine, RequestStream
from deepseek_serve.engine.types import GenerationRequest, SamplingParams, StreamDelta, TokenLogprob, Usage
from deepseek_serve.serving.plan import GenerationPlan, PromptInput
from deepseek_serve.serving.run import GenerationRun
from deepseek_serve.serving.services import Services
from deepseek_serve.serving.stream import stream_events
from tests.support.settings import make_settings

PROMPT = "The capital of France is"


async def wait_ended(stream: RequestStream) -> None:
    """Wait, without reading, until the request's last delta has arrived."""
    arrived = asyncio.Event()
    stream.set_listener(arrived.set)
    async with asyncio.timeout(60):
        while not stream.ended:
            await arrived.wait()
            arrived.clear()


def request(request_id: str, ids: list[int], **params: object) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        prompt_token_ids=tuple(ids),
        params=SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, **params),  # type: ignore[arg-type]
    )


async def test_take_merges_every_step_that_arrived(engine: AsyncEngine) -> None:
    ids = engine.tokenize(PROMPT)
    text, last = await engine.complete(request("take-ref", ids, logprobs=True))
    reference = [d async for d in engine.generate(request("take-ref2", ids, logprobs=True))]

    stream = await engine.add_request(request("take", ids, logprobs=True))
    await wait_ended(stream)
    deltas, arrivals = stream.take()
    assert len(deltas) == 1 and stream.finished
    merged = deltas[0]
    assert merged.text == text == "".join(d.text for d in reference)
    assert merged.token_ids == tuple(t for d in reference for t in d.token_ids)
    assert len(merged.token_ids) == 12
    assert merged.logprobs is not None and [lp.token for lp in merged.logprobs] == [
        lp.token for d in reference for lp in d.logprobs or ()
    ]
    assert merged.finished and merged.finish_reason == "length"
    assert merged.usage is not None and last.usage is not None  # the prefix cache may serve the prompt
    assert merged.usage.completion_tokens == last.usage.completion_tokens == 12
    assert len(arrivals) == sum(1 for d in reference if d.token_ids) and arrivals == sorted(arrivals)
    assert stream.take() == ([], [])


async def test_a_failed_end_stays_apart_from_the_text_before_it(engine: AsyncEngine) -> None:
    stream = RequestStream(engine, "apart", 1)
    lp = TokenLogprob(token_id=1, token="a", logprob=-0.5, bytes=(97,))
    stream._put(StreamDelta(text="a", token_ids=(1,), logprobs=(lp,)))
    stream._put(StreamDelta(text="b", token_ids=(2,), logprobs=(lp,)))
    stream._put(StreamDelta(text="", token_ids=(), finished=True, finish_reason="timeout", error="deadline"))
    deltas, _ = stream.take()
    assert [(d.text, d.token_ids, d.finish_reason) for d in deltas] == [("ab", (1, 2), None), ("", (), "timeout")]
    assert deltas[0].logprobs == (lp, lp) and not deltas[0].finished and stream.finished

    done = RequestStream(engine, "merged-end", 1)
    done._put(StreamDelta(text="a", token_ids=(1,)))
    usage = Usage(prompt_tokens=1, completion_tokens=2, cached_tokens=0)
    done._put(StreamDelta(text="b", token_ids=(2,), finished=True, finish_reason="stop", usage=usage))
    deltas, _ = done.take()
    assert len(deltas) == 1 and deltas[0].text == "ab" and deltas[0].usage == usage and deltas[0].logprobs is None


async def test_stream_behind_the_engine_sends_the_whole_answer(engine: AsyncEngine, tmp_path: Path) -> None:
    services = Services(settings=make_settings(tmp_path), engine=engine)
    ids = engine.tokenize(PROMPT)
    text, _ = await engine.complete(request("behind-ref", ids))

    def new_run(name: str) -> GenerationRun:
        plan = GenerationPlan(
            endpoint="chat.completions",
            completion_id=f"chatcmpl-{name}",
            model=engine.model_info.id,
            prompts=(PromptInput(tuple(ids), PROMPT),),
            params=SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
            stream=True,
            include_usage=True,
        )
        return GenerationRun(services, Principal(key_id=None), plan)

    async def chunks(run: GenerationRun, behind: bool) -> list[dict]:
        await run.accounting.admit()
        await run.submit()
        if behind:  # the whole answer is waiting before the stream reads any of it
            await wait_ended(run.choices[0].stream)
        raw = b"".join([e async for e in stream_events(run, 15.0, None)])
        events = [e for e in raw.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        return [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-1]]

    for behind in (True, False):
        run = new_run(f"behind-{behind}")
        datas = await chunks(run, behind)
        contents = [d["choices"][0]["delta"]["content"] for d in datas if d["choices"]]
        assert contents[0] == ""  # the opening chunk (role)
        assert "".join(contents) == text
        assert datas[-1]["usage"]["completion_tokens"] == 12
        assert [d["choices"][0]["finish_reason"] for d in datas if d["choices"]][-1] == "length"
        if behind:
            assert len(contents) == 2  # the role, then all 12 tokens in one chunk
        assert len(run.choices[0].arrivals) == 12  # one per engine step, merged or not


async def test_under_load_a_stream_sends_one_event_per_interval(engine: AsyncEngine, tmp_path: Path) -> None:
    # one open stream counts as load here; a 1 s interval merges every token after the first
    settings = make_settings(tmp_path, stream_coalesce_ms=1000.0, stream_coalesce_streams=1)
    services = Services(settings=settings, engine=engine)
    ids = engine.tokenize(PROMPT)
    text, _ = await engine.complete(request("coalesce-ref", ids))
    plan = GenerationPlan(
        endpoint="completions",
        completion_id="cmpl-coalesce",
        model=engine.model_info.id,
        prompts=(PromptInput(tuple(ids), PROMPT),),
        params=SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        stream=True,
        include_usage=True,
    )
    run = GenerationRun(services, Principal(key_id=None), plan)
    await run.accounting.admit()
    await run.submit()
    raw = b"".join([e async for e in stream_events(run, 15.0, None)])
    datas = [orjson.loads(e.removeprefix(b"data: ")) for e in raw.split(b"\n\n") if e and e != b"data: [DONE]"]
    texts = [d["choices"][0]["text"] for d in datas if d["choices"]]
    assert "".join(texts) == text
    assert datas[-1]["usage"]["completion_tokens"] == 12
    assert len(texts) < 12  # several tokens per event
    assert len(run.choices[0].arrivals) == 12  # the ITL metrics still see every step
