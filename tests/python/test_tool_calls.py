"""Issue 19: tool calling as vLLM 0.32 serves it, through a real `tpuserve serve` (SmolLM2 on
CPU) with `--enable-auto-tool-choice --tool-call-parser hermes`. SmolLM2 seldom calls a tool
by itself, so the parsers' reading of calls is covered by the Rust unit tests
(`crates/server/src/tools`); here: plain answers stay plain, tool messages render, the tool
fields are checked as vLLM checks them, and the flags start or refuse as vLLM's do."""

import json
import subprocess

import pytest
from tpuserve_proc import ServerProcess, binary, free_port

from test_vllm_dropin import send, sse

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the capital of France?"}]
# Shows how many tools the template was given (requests bring it: --trust-request-chat-template).
COUNT_TEMPLATE = ("{{ (tools | length) if tools else 0 }}|"
                  "{% for m in messages %}{{ m['content'] }}{% endfor %}")


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--max-model-len", "512", "--enable-auto-tool-choice",
                      "--tool-call-parser", "hermes", "--exclude-tools-when-tool-choice-none",
                      "--trust-request-chat-template")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_plain_answer_with_auto_tools_has_no_tool_calls(client, model):
    """tool_choice defaults to "auto" when tools are given; an answer without a call is plain
    content with the engine's finish_reason."""
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=24,
                                       temperature=0)
    c = r.choices[0]
    assert "<tool_call>" not in c.message.content
    assert not c.message.tool_calls
    assert c.finish_reason in ("stop", "length")
    # The same answer streamed: content deltas only, same text, same finish.
    chunks = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                            max_tokens=24, temperature=0, stream=True)
    text, finish = "", None
    for ch in chunks:
        d = ch.choices[0].delta
        assert not d.tool_calls
        text += d.content or ""
        finish = ch.choices[0].finish_reason or finish
    assert (text, finish) == (c.message.content, c.finish_reason)


def test_streamed_text_with_auto_tools_has_no_tool_calls_field(server, model):
    """vLLM 0.32 sends text deltas as `{"content": ...}` alone: an empty `tool_calls` list in
    every chunk reads as a call to a client that tests `if (delta.tool_calls)`."""
    body = {"model": model, "messages": ASK, "tools": TOOLS, "max_tokens": 6,
            "temperature": 0, "stream": True}
    deltas = [c["choices"][0]["delta"] for c in sse(server.port, "/v1/chat/completions", body)
              if c["choices"]]
    assert any(d.get("content") for d in deltas)
    assert all("tool_calls" not in d for d in deltas), deltas


def test_n2_stream_each_choice_finishes(server, model):
    body = {"model": model, "messages": ASK, "tools": TOOLS, "tool_choice": "auto", "n": 2,
            "max_tokens": 8, "temperature": 1, "seed": 1, "stream": True}
    chunks = sse(server.port, "/v1/chat/completions", body)
    finishes = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"]
                for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]}
    assert sorted(finishes) == [0, 1] and set(finishes.values()) <= {"stop", "length"}


def _tool_history(content):
    return ASK + [
        {"role": "assistant", "content": content, "tool_calls": [
            {"id": "chatcmpl-tool-1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "chatcmpl-tool-1", "content": "Sunny, 21 C"},
    ]


def test_tool_messages_render(client, model):
    """An assistant message with tool_calls (arguments as a JSON string) and the tool's answer
    go through the chat template (vLLM parses the arguments to an object for it)."""
    r = client.chat.completions.create(model=model, messages=_tool_history(""), tools=TOOLS,
                                       max_tokens=4, temperature=0)
    assert r.choices[0].message.role == "assistant"


def test_a_tool_call_turn_with_null_content_renders_as_empty_content(server, model):
    """What a client sends back after a tool call (the SDK's message has `content: None`, or
    no content at all) renders as vLLM's string content format renders it: content "" (it
    was a 400: the template added None to a string)."""
    def prompt(content):
        body = {"model": model, "messages": _tool_history(content), "tools": TOOLS,
                "max_tokens": 1, "temperature": 0, "return_token_ids": True}
        if content is ...:
            del body["messages"][1]["content"]
        status, r = send(server.port, "POST", "/v1/chat/completions", body)
        assert status == 200, r
        return r["prompt_token_ids"]
    empty = prompt("")
    assert prompt(None) == empty and prompt(...) == empty


def _prompt_ids(port, model, **extra):
    body = {"model": model, "messages": ASK, "max_tokens": 1, "temperature": 0,
            "return_token_ids": True, "chat_template": COUNT_TEMPLATE, **extra}
    status, r = send(port, "POST", "/v1/chat/completions", body)
    assert status == 200, r
    return r["prompt_token_ids"]


def test_exclude_tools_when_tool_choice_none(server, model):
    none = _prompt_ids(server.port, model, tools=TOOLS, tool_choice="none")
    assert none == _prompt_ids(server.port, model)
    assert _prompt_ids(server.port, model, tools=TOOLS, tool_choice="auto") != none


@pytest.mark.parametrize("extra,param,message", [
    ({"tools": []}, "tools", "`tools` must not be an empty array"),
    ({"tool_choice": "auto"}, "tool_choice", "When using `tool_choice`, `tools` must be set."),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice",
     "Invalid value for `tool_choice`: sometimes!"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "The tool specified in `tool_choice` does not match any of the specified"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {}}},
     "tool_choice.function.name", "Expected field `name` in `function` in `tool_choice`!"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools",
     "function.name"),
    ({"tools": TOOLS, "tool_choice": "auto", "use_beam_search": True, "n": 2}, "tools",
     "not supported together with use_beam_search"),
])
def test_tool_fields_are_checked_as_vllm(server, model, extra, param, message):
    body = {"model": model, "messages": ASK, "max_tokens": 2, **extra}
    status, r = send(server.port, "POST", "/v1/chat/completions", body)
    assert status == 400 and message in r["error"]["message"], r
    assert r["error"]["param"] == param, r


# Earlier turns showing calls in hermes' format: SmolLM2 then calls a tool itself.
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s"}}\n</tool_call>'
FEW_SHOT = [{"role": "system", "content": "You call tools by writing <tool_call> blocks."},
            {"role": "user", "content": "Weather in London and Rome?"},
            {"role": "assistant", "content": CALL % "London" + "\n" + CALL % "Rome"},
            {"role": "user", "content": "Weather in Oslo and Paris?"}]
CITIES = ["Oslo", "London"]


def _weather(strict=None, cities=None):
    city = {"type": "string", **({"enum": cities} if cities else {})}
    f = {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": city}, "required": ["city"]}}
    if strict is not None:
        f["strict"] = strict
    return [{"type": "function", "function": f}]


def _auto_calls(port, tools, stream=False, **extra):
    """The calls of a greedy "auto" answer to FEW_SHOT: (name, arguments) each, the finish
    reason and the completion tokens (streamed: the calls put together from the deltas)."""
    body = {"messages": FEW_SHOT, "tools": tools, "max_tokens": 80, "temperature": 0, **extra}
    if not stream:
        status, r = send(port, "POST", "/v1/chat/completions", body)
        assert status == 200, r
        c = r["choices"][0]
        calls = [(t["function"]["name"], json.loads(t["function"]["arguments"]))
                 for t in c["message"].get("tool_calls") or []]
        return calls, c["finish_reason"], r["usage"]["completion_tokens"]
    chunks = sse(port, "/v1/chat/completions", {**body, "stream": True,
                                                "stream_options": {"include_usage": True}})
    names, args, finish, used = {}, {}, None, None
    for ch in chunks:
        used = (ch.get("usage") or {}).get("completion_tokens", used)
        for c in ch["choices"]:
            finish = c["finish_reason"] or finish
            for t in c["delta"].get("tool_calls") or []:
                i = t["index"]
                if t.get("function", {}).get("name"):
                    names[i] = t["function"]["name"]
                args[i] = args.get(i, "") + (t.get("function", {}).get("arguments") or "")
    calls = [(names[i], json.loads(args[i])) for i in sorted(names)]
    return calls, finish, used


@pytest.mark.parametrize("stream", [False, True])
def test_strict_tools_hold_auto_calls_to_their_schema(server, stream):
    """vLLM 0.32 constrains an "auto" answer's calls when a tool says `strict: true`: free
    text, but once `<tool_call>` appears the call must name a tool and its arguments follow
    the tool's schema. SmolLM2 asks for Oslo and Paris here; Paris is not in the schema's
    enum, so a strict tool gets only schema values (without `strict` the model's own pick
    stands: the arguments are not held to the schema, as vLLM's are not)."""
    calls, finish, _ = _auto_calls(server.port, _weather(True, CITIES), stream)
    assert finish == "tool_calls" and len(calls) >= 1, calls
    assert all(n == "get_weather" and a["city"] in CITIES for n, a in calls), calls
    free, _, _ = _auto_calls(server.port, _weather(None, CITIES), stream)
    assert free and any(a.get("city") not in CITIES for _, a in free), free


def test_one_call_ends_the_answer_when_parallel_tool_calls_is_false(server):
    """`parallel_tool_calls: false` constrains the call (vLLM raises the strict level to
    "function") and ends the answer after it: the model, which calls twice when it may,
    stops after one call, and generates fewer tokens."""
    two, finish, used = _auto_calls(server.port, _weather())
    assert len(two) == 2 and finish == "tool_calls", two
    one, finish, used_one = _auto_calls(server.port, _weather(), parallel_tool_calls=False)
    assert one == two[:1] and finish == "tool_calls" and used_one < used, (one, used_one, used)


def test_tool_strict_level_parameter_holds_every_tool_to_its_schema():
    """`--tool-strict-level parameter`: every tool's arguments follow its schema, strict or
    not; `function`: the call is constrained but its arguments are free."""
    for level, held in (("parameter", True), ("function", False)):
        s = ServerProcess("--max-model-len", "512", "--enable-auto-tool-choice",
                          "--tool-call-parser", "hermes", "--tool-strict-level", level)
        try:
            calls, finish, _ = _auto_calls(s.port, _weather(None, CITIES))
        finally:
            s.close()
        assert finish == "tool_calls" and calls, (level, calls)
        assert all(a["city"] in CITIES for _, a in calls) == held, (level, calls)


ANSWER = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
    "type": "object", "properties": {"answer": {"type": "string", "maxLength": 40}},
    "required": ["answer"]}}}


@pytest.mark.parametrize("messages", [FEW_SHOT, ASK], ids=["calls", "answers"])
def test_strict_tools_beside_a_response_format_give_calls_or_that_format(server, messages):
    """What the OpenAI Agents SDK sends for an agent with an output type and strict function
    tools: vLLM 0.32 makes the answer either the tools' calls or the structured output
    (`OrFormat`), never free text. The few-shot conversation calls the tool (its arguments
    held to the strict schema: the enum, no other keys); a plain question may do either, and
    whichever it does is well-formed."""
    body = {"messages": messages, "tools": _weather(True, CITIES), "response_format": ANSWER,
            "max_tokens": 80, "temperature": 0}
    status, r = send(server.port, "POST", "/v1/chat/completions", body)
    assert status == 200, r
    msg = r["choices"][0]["message"]
    if messages is FEW_SHOT:
        assert msg.get("tool_calls"), msg
    if msg.get("tool_calls"):
        args = [json.loads(t["function"]["arguments"]) for t in msg["tool_calls"]]
        assert all(list(a) == ["city"] and a["city"] in CITIES for a in args), args
        assert r["choices"][0]["finish_reason"] == "tool_calls", r
        assert not msg["content"], msg
    else:
        assert list(json.loads(msg["content"])) == ["answer"], msg


def test_llama3_json_strict_tools_beside_a_response_format():
    """The same calls-or-output answer with the llama3_json parser (vLLM 0.32: xgrammar's
    triggered tags with `at_least_one`, so a call opens the answer), served on tiny-llama3
    (Llama 3.1's tokenizer and template, random weights): whichever branch the model takes,
    the answer is well-formed. Both start with `{"`; a logit bias on the next token (`name`
    or `answer`) picks the branch, so each is exercised, streamed and whole."""
    from tpuserve_proc import SHARED
    tiny = str(SHARED / "fixtures" / "tiny-llama3" / "model")
    s = ServerProcess(tiny, "--max-model-len", "1024", "--enable-auto-tool-choice",
                      "--tool-call-parser", "llama3_json")
    try:
        def last_id(text):
            status, r = send(s.port, "POST", "/tokenize", {"prompt": text})
            assert status == 200, r
            return r["tokens"][-1]
        answer = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
            "type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
            "required": ["answer"]}}}
        for word, stream in (("name", False), ("name", True), ("answer", False)):
            body = {"messages": ASK, "tools": _weather(True, CITIES), "response_format": answer,
                    "parallel_tool_calls": False, "max_tokens": 60, "temperature": 0,
                    "logit_bias": {str(last_id('{"' + word)): 100}}
            if stream:
                calls, finish, _ = _auto_calls(s.port, _weather(True, CITIES), True,
                                               messages=ASK, response_format=answer,
                                               parallel_tool_calls=False,
                                               logit_bias=body["logit_bias"])
                assert finish == "tool_calls" and len(calls) == 1, calls
                assert calls[0][0] == "get_weather" and calls[0][1]["city"] in CITIES, calls
                continue
            status, r = send(s.port, "POST", "/v1/chat/completions", body)
            assert status == 200, r
            c = r["choices"][0]
            if word == "name":
                calls = c["message"].get("tool_calls") or []
                assert c["finish_reason"] == "tool_calls" and len(calls) == 1, c
                args = json.loads(calls[0]["function"]["arguments"])
                assert calls[0]["function"]["name"] == "get_weather", c
                assert list(args) == ["city"] and args["city"] in CITIES, args
                assert not c["message"]["content"], c
            else:
                assert not c["message"].get("tool_calls"), c
                assert json.loads(c["message"]["content"])["answer"] in ("yes", "no"), c
                assert c["finish_reason"] == "stop", c
    finally:
        s.close()


@pytest.mark.parametrize("tools,extra,message", [
    ([{"type": "function", "function": {"name": "f", "strict": "maybe"}}], {},
     "tools[0].function.strict: Input should be a valid boolean"),
    (_weather(True), {"structured_outputs": {"regex": "[a-z]+"}},
     "together with a regex or grammar structured output are not supported"),
    ([{"type": "function", "function": {"name": "f", "strict": True,
                                        "parameters": {"type": "nonsense"}}}], {},
     "Invalid tools specification: failed to compile JSON schema: Invalid type: nonsense"),
])
def test_strict_tool_requests_refused_by_name(server, tools, extra, message):
    body = {"messages": ASK, "max_tokens": 2, "tools": tools, **extra}
    status, r = send(server.port, "POST", "/v1/chat/completions", body)
    assert status == 400 and message in r["error"]["message"], r
    assert " | " not in r["error"]["message"], r
    assert r["error"]["param"] == "tools", r


def test_without_a_parser_tools_default_to_auto_and_are_refused():
    """vLLM's request model makes a missing tool_choice "auto" when tools are given, which a
    server without --enable-auto-tool-choice refuses; tool_choice "none" renders them."""
    s = ServerProcess("--max-model-len", "256")
    try:
        body = {"messages": ASK, "max_tokens": 2, "tools": TOOLS}
        status, r = send(s.port, "POST", "/v1/chat/completions", body)
        assert status == 400 and '"auto" tool choice requires' in r["error"]["message"], r
        status, r = send(s.port, "POST", "/v1/chat/completions", {**body, "tool_choice": "none"})
        assert status == 200, r
    finally:
        s.close()


def _serve_exit(*args, timeout=240):
    p = subprocess.run([binary(), "serve", "--port", str(free_port()), *args],
                       capture_output=True, text=True, timeout=timeout)
    lines = [l for l in p.stderr.splitlines() if l.strip() and "INFO" not in l
             and "WARN" not in l]
    return p.returncode, lines


@pytest.mark.parametrize("args,words", [
    (["--enable-auto-tool-choice"], ["--enable-auto-tool-choice requires --tool-call-parser"]),
    (["--enable-auto-tool-choice", "--tool-call-parser", "pythonic"],
     ["--tool-call-parser pythonic", "not supported", "hermes"]),
    (["--tool-call-parser", "qwen3_xml"], ["qwen3_xml", "not supported"]),
    (["--tool-parser-plugin", "my_parser.py"], ["--tool-parser-plugin", "not supported"]),
])
def test_tool_flags_refused_by_name(args, words):
    rc, lines = _serve_exit(*args)
    assert rc == 2 and len(lines) == 1, (rc, lines)
    assert all(w in lines[0] for w in words), lines


def test_an_unknown_tool_strict_level_exits_2_naming_the_levels():
    rc, lines = _serve_exit("--tool-strict-level", "strict")
    assert rc == 2 and "--tool-strict-level" in lines[0], lines
    assert "expected one of auto, function, parameter" in lines[0], lines


def test_llama3_json_needs_the_python_tag_token():
    """vLLM checks the parser against the tokenizer at start-up: SmolLM2 has no
    <|python_tag|>, so llama3_json cannot read its calls."""
    rc, lines = _serve_exit("--max-model-len", "256", "--enable-auto-tool-choice",
                            "--tool-call-parser", "llama3_json")
    assert rc == 2 and any("<|python_tag|>" in l and "llama3_json" in l for l in lines), lines
