"""Issue 19: tool_choice "required" and a named function, which vLLM enforces by constraining
the answer to a JSON schema built from the tools. These tests need the constrained decoding
(llguidance) that `ChatInput.tool_mode.schema` feeds: without it SmolLM2 writes free text and
the calls come back empty or unparseable."""

import json

import jsonschema
import pytest
from openai import OpenAI
from tpuserve_proc import ServerProcess

WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string"}},
        "required": ["timezone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def client():
    s = ServerProcess("--max-model-len", "512", "--enable-auto-tool-choice",
                      "--tool-call-parser", "hermes")
    try:
        yield OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="x", max_retries=0,
                     timeout=300)
    finally:
        s.close()


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_named_function_call(client, model):
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                       tool_choice=NAMED, max_tokens=64, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "stop"  # vLLM: a named call keeps "stop"
    assert c.message.content == ""
    [call] = c.message.tool_calls
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_required_calls(client, model):
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                       tool_choice="required", max_tokens=96, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert c.message.tool_calls
    for call in c.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_single_call_without_parallel_tool_calls(client, model):
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                       tool_choice="required", parallel_tool_calls=False,
                                       max_tokens=96, temperature=0)
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1
    jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMAS[calls[0].function.name])


def test_streamed_named_call_assembles_into_the_same_call(client, model):
    whole = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                           tool_choice=NAMED, max_tokens=64, temperature=0)
    want = whole.choices[0].message.tool_calls[0]
    chunks = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                            tool_choice=NAMED, max_tokens=64, temperature=0,
                                            stream=True)
    ids, name, args, finish = set(), None, "", None
    for ch in chunks:
        if not ch.choices:
            continue
        for tc in ch.choices[0].delta.tool_calls or []:
            assert tc.index == 0
            if tc.id:
                ids.add(tc.id)
                name = tc.function.name
            args += tc.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    assert len(ids) == 1 and name == "get_weather" and finish == "stop"
    assert args == want.function.arguments
    jsonschema.validate(json.loads(args), WEATHER)
