"""Issue 19: tool_choice "required" and a named function, enforced by constraining the answer
to a JSON schema built from the tools (`ChatInput.tool_mode.schema` becomes the request's
structured-output constraint): the arguments always parse and validate, greedy or sampled."""

import concurrent.futures as cf
import json

import jsonschema
import pytest
from tpuserve_proc import ServerProcess

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def client():
    # Closed objects: vLLM's schema for "required" leaves each call object open, and a sampled
    # answer may then add properties until max_tokens.
    s = ServerProcess("--max-model-len", "512", "--enable-auto-tool-choice",
                      "--tool-call-parser", "hermes", "--structured-outputs-config",
                      '{"disable_additional_properties": true}')
    try:
        yield s.openai()
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


def test_hundred_sampled_calls_validate(client, model):
    # 50 seeds each of a named and a required choice, sampled at temperature 1 (required with
    # one call: a list of calls has no length bound, and sampling may grow it past max_tokens).
    jobs = [(choice, seed) for choice in (NAMED, "required") for seed in range(50)]

    def run(job):
        choice, seed = job
        return client.chat.completions.create(
            model=model, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=200,
            temperature=1.0, seed=seed, parallel_tool_calls=False)

    with cf.ThreadPoolExecutor(16) as ex:
        results = list(ex.map(run, jobs))
    for (choice, seed), r in zip(jobs, results):
        c = r.choices[0]
        assert c.finish_reason == ("stop" if choice is NAMED else "tool_calls"), (seed, c)
        assert c.message.tool_calls, (seed, c)
        for call in c.message.tool_calls:
            if choice is NAMED:
                assert call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
