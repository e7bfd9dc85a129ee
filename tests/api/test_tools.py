"""Tool calls: rendering for the DeepSeek template (real fixture), parsing answers, and a round trip
(call, tool result, final answer) with the openai SDK against a real server, streaming and not."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from deepseek_serve.engine.chat_template import ChatTemplate
from deepseek_serve.serving.schemas import ChatCompletionRequest
from deepseek_serve.serving.tools import (
    ToolSetup,
    ToolStream,
    forced_grammar,
    parse_tool_calls,
    render_messages,
    tool_format,
)
from tests.support.packs import QWEN_05B, pack_gguf
from tests.support.server import ServeProcess

FIXTURES = Path(
    os.environ.get("DEEPSEEK_FIXTURES", Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "deepseek")
)
MODEL = "SmolLM2-135M-Instruct"

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]},
    },
}


def _history() -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"},
    ]


def _render(template_source: str, tools: list[dict[str, Any]] | None) -> str:
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": _history()})
    from deepseek_serve.serving.reasoning import prepare_messages

    fmt = tool_format(template_source)
    messages, extra = render_messages(prepare_messages(body.messages), body.messages, fmt, tools)
    return ChatTemplate(template_source, bos_token="<｜begin▁of▁sentence｜>").render(messages, **extra)


@pytest.mark.skipif(not FIXTURES.exists(), reason="DeepSeek fixtures not present")
def test_deepseek_template_renders_tool_history_with_its_tokens() -> None:
    source = json.loads((FIXTURES / "deepseek-r1-distill-qwen-1.5b" / "tokenizer_config.json").read_text())[
        "chat_template"
    ]
    assert tool_format(source) == "deepseek"
    text = _render(source, [WEATHER])
    assert (
        "<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
        '{"city": "Paris", "unit": "celsius"}\n```<｜tool▁call▁end｜>'
    ) in text
    assert "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>21 degrees, sunny<｜tool▁output▁end｜>" in text
    # the template has no tool list of its own: the tools and how to call them lead the prompt
    assert text.index('"name": "get_weather"') < text.index("<｜User｜>")
    assert "<tool_call>" in text


@pytest.mark.slow
def test_qwen_template_renders_tools_and_history_itself() -> None:
    import llama_cpp as lc

    params = lc.llama_model_default_params()
    params.vocab_only = True
    model = lc.llama_model_load_from_file(str(pack_gguf(QWEN_05B.name)).encode(), params)
    try:
        source = lc.llama_model_chat_template(model, None).decode()
    finally:
        lc.llama_model_free(model)
    assert tool_format(source) == "hermes"
    text = _render(source, [WEATHER])
    assert '"name": "get_weather", "description": "Current weather of a city"' in text  # the template's tool list
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    assert f"<|im_start|>assistant\n{call}<|im_end|>" in text
    assert "<tool_response>\n21 degrees, sunny\n</tool_response>" in text
    assert "You can call these functions" not in text  # no generic instructions on top of the template's


def test_generic_template_renders_calls_and_results_as_text() -> None:
    source = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert tool_format(source) == "generic"
    text = _render(source, [WEATHER])
    assert text.startswith("<|system|>You can call these functions")
    assert (
        '<|assistant|><tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in text
    )
    assert "<|user|><tool_response>\n21 degrees, sunny\n</tool_response>" in text


def test_parse_hermes_and_deepseek_shapes() -> None:
    setup = ToolSetup("generic", ("get_weather", "get_time"))
    content, calls = parse_tool_calls(
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>',
        setup,
    )
    assert content == "Sure."
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": "Oslo", "unit": "celsius"}
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")
    # parallel_tool_calls false keeps the first; unknown names and broken JSON stay content
    _, one = parse_tool_calls(
        "<tool_call>" + '{"name": "get_time", "arguments": {}}</tool_call>' * 2,
        ToolSetup("generic", ("get_time",), parallel=False),
    )
    assert len(one) == 1
    text = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call> <tool_call>{oops</tool_call>'
    assert parse_tool_calls(text, setup) == (text, [])
    ds = (
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n"
        '{"zone": "CET"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
    )
    content, calls = parse_tool_calls(ds, ToolSetup("deepseek", ("get_time",)))
    assert content == "" and calls[0].function.name == "get_time"


def test_tool_stream_holds_back_a_possible_marker() -> None:
    stream = ToolStream(ToolSetup("generic", ("get_time",)))
    out = "".join(stream.push(p) for p in ["Hello <", "tool", "_call>", '{"name": "get_time", "arguments": {}}'])
    assert out == "Hello "
    rest, calls = stream.finish()
    assert rest == "" and calls[0].function.name == "get_time"
    plain = ToolStream(ToolSetup("generic", ("get_time",)))
    assert plain.push("a < b") == "a < b" and plain.push(" <tool") == " " and plain.finish() == ("<tool", [])


def test_forced_grammar_names_the_bad_tool_schema() -> None:
    grammar = forced_grammar([WEATHER, TIME], None)
    assert grammar.startswith("root ::= ds-call-block\n")
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}
    with pytest.raises(Exception) as info:
        forced_grammar([WEATHER, bad], None)
    assert "tools[1].function.parameters.not" in str(info.value)


def _grammar_accepts(grammar: str, text: str, tmp_path: Path, engine: str) -> bool:
    """Whether the grammar, as the llama.cpp runner builds it with `engine`, takes `text` (spelled in
    the test model's tokens) to its end, with an end-of-generation token allowed after it."""
    import llama_cpp as lc

    from deepseek_serve.engine.runners.llamacpp.sampling import GrammarFactory
    from deepseek_serve.engine.runners.llamacpp.tokenizer import LlamaCppTokenizer
    from deepseek_serve.models.resolve import resolve_model
    from tests.support.settings import TEST_MODEL

    path = resolve_model(TEST_MODEL, cache_dir=tmp_path, download=False).path
    lc.llama_backend_init()
    params = lc.llama_model_default_params()
    params.vocab_only = True
    model = lc.llama_model_load_from_file(str(path).encode(), params)
    tokenizer = LlamaCppTokenizer(model)
    compiled = GrammarFactory(tokenizer, engine).build(grammar)
    try:
        for token in tokenizer.encode(text, add_special_tokens=False):
            if not compiled.allows(token):
                return False
            compiled.accept(token)
        return compiled.allows(tokenizer.eos_token_ids[0])
    finally:
        compiled.free()
        lc.llama_model_free(model)


@pytest.mark.parametrize("engine", ["llama", "llguidance"])
def test_required_with_parallel_calls_admits_several_calls_a_named_choice_one(tmp_path: Path, engine: str) -> None:
    if engine == "llguidance":
        pytest.importorskip("llguidance", reason="the optional grammar extra (llguidance) is not installed")
    weather = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'
    time_call = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    two = f"{weather}\n{time_call}"

    def accepts(grammar: str, text: str) -> bool:
        return _grammar_accepts(grammar, text, tmp_path, engine)

    required_parallel = forced_grammar([WEATHER, TIME], None, parallel=True)
    assert accepts(required_parallel, weather)
    assert accepts(required_parallel, two)
    assert not accepts(required_parallel, f"{weather}\nHello")
    assert accepts(required_parallel, "\n".join([time_call] * 8))
    assert not accepts(required_parallel, "\n".join([time_call] * 9))  # bounded: MAX_FORCED_CALLS
    assert not accepts(forced_grammar([WEATHER, TIME], None, parallel=False), two)
    named = forced_grammar([WEATHER, TIME], "get_weather", parallel=True)
    assert accepts(named, weather)
    assert not accepts(named, f"{weather}\n{weather}")
    assert not accepts(named, time_call)


# --- against a real server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with ServeProcess(Path(tmp_path_factory.mktemp("tools"))) as srv:
        yield srv


def test_round_trip_with_the_sdk(server: ServeProcess) -> None:
    client = server.openai_client()
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80,
        temperature=0,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].type == "function" and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[0].id, "content": "21 degrees and sunny"},
    ]
    final = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER, TIME],
        max_tokens=20,
        temperature=0,
    )
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert final.usage is not None and first.usage is not None
    assert final.usage.prompt_tokens > first.usage.prompt_tokens + 10  # the call and its result are in the prompt
    # with tool_choice none the tools are neither offered nor parsed
    plain = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=8,
        temperature=0,
    )
    assert plain.choices[0].message.tool_calls is None


def _streamed_calls(stream: Any) -> tuple[list[tuple[str, str, str]], list[str]]:
    """((id, name, arguments) per call, finish reasons) of a streamed answer, checking OpenAI's delta
    order: a call's first delta carries its index, id and name, the following ones only arguments."""
    calls: dict[int, list[str]] = {}
    reasons = []
    for chunk in stream:
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                assert d.function is not None
                if d.index not in calls:
                    assert d.index == len(calls) and d.id and d.function.name and d.type == "function"
                    calls[d.index] = [d.id, d.function.name, d.function.arguments or ""]
                else:
                    assert d.id is None and d.function.name is None
                    calls[d.index][2] += d.function.arguments or ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    return [(i, n, a) for i, n, a in calls.values()], reasons


def test_required_streams_tool_call_deltas(server: ServeProcess) -> None:
    """`required` with parallel calls allowed (the default) may answer several calls, 1 to 8, each
    valid; with parallel_tool_calls false exactly one."""
    client = server.openai_client()
    tools = {"get_weather": WEATHER, "get_time": TIME}
    for parallel in (True, False):
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Time in Berlin?"}],
            tools=[WEATHER, TIME],
            tool_choice="required",
            parallel_tool_calls=parallel,
            max_tokens=160,
            temperature=0.7,
            seed=3,
            stream=True,
        )
        calls, reasons = _streamed_calls(stream)
        assert reasons == ["tool_calls"]
        assert 1 <= len(calls) <= (8 if parallel else 1), calls
        assert len({call_id for call_id, _, _ in calls}) == len(calls)
        for _, name, arguments in calls:
            jsonschema.validate(json.loads(arguments), tools[name]["function"]["parameters"])


def test_tool_requests_the_server_cannot_honour_are_400(server: ServeProcess) -> None:
    def post(**fields: Any) -> httpx.Response:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **fields}
        return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)

    cases = [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}],
                "tool_choice": "required",
            },
            "tools",
        ),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ]
    for fields, param in cases:
        r = post(**fields)
        assert r.status_code == 400, (fields, r.text)
        assert (r.json()["error"]["param"] or "").startswith(param), (fields, r.text)
    history = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}],
        }
    ]
    r = post(messages=[{"role": "user", "content": "x"}, *history])
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


def test_langchain_bind_tools_and_structured_output(server: ServeProcess) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from pydantic import BaseModel, Field

    llm = langchain_openai.ChatOpenAI(
        base_url=f"{server.url}/v1",
        api_key="none",
        model=MODEL,
        temperature=0,
        max_tokens=80,
        max_retries=0,
        timeout=120,
    )
    bound = llm.bind_tools([WEATHER, TIME], tool_choice="get_weather")
    question = HumanMessage("What is the weather in Rome?")
    ai = bound.invoke([question])
    assert isinstance(ai, AIMessage) and len(ai.tool_calls) == 1
    call = ai.tool_calls[0]
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER["function"]["parameters"])
    final = bound.bind(tool_choice="auto").invoke(
        [question, ai, ToolMessage(content="18 degrees, cloudy", tool_call_id=call["id"])]
    )
    assert isinstance(final, AIMessage)
    # streaming: the chunks add up to one complete call
    merged = None
    for chunk in bound.stream([question]):
        merged = chunk if merged is None else merged + chunk
    assert merged is not None and len(merged.tool_calls) == 1
    jsonschema.validate(merged.tool_calls[0]["args"], WEATHER["function"]["parameters"])

    class Answer(BaseModel):
        city: str = Field(max_length=20)
        sunny: bool

    for method in ("json_schema", "function_calling"):
        result = llm.with_structured_output(Answer, method=method).invoke("Is it sunny in Rome?")
        assert isinstance(result, Answer), method
