"""Issue 4 acceptance: the official `openai` Python client against a real `tpuserve serve`.

The server binary comes from $TPUSERVE_BIN (scripts/test.sh sets it to the release build);
each module run starts one server on a free loopback port with an API key and
--max-model-len 256, and kills it at the end. Expected texts are the SmolLM2 goldens
(greedy, transformers float32) from ../shared/fixtures.
"""

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from openai import AuthenticationError, BadRequestError, NotFoundError, OpenAI
from tpuserve_proc import binary as _binary, free_port as _free_port

ROOT = Path(__file__).resolve().parents[2]
GOLDENS = ROOT.parent / "shared" / "fixtures" / "smollm2" / "goldens.json"
API_KEY = "test-key-123"
MAX_MODEL_LEN = 256
TOL = 1e-3


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    log = tempfile.TemporaryFile(mode="w+b")
    env = dict(os.environ, RUST_LOG="info")
    env.pop("VLLM_API_KEY", None)
    proc = subprocess.Popen(
        [_binary(), "serve", "--host", "127.0.0.1", "--port", str(port),
         "--max-model-len", str(MAX_MODEL_LEN), "--api-key", API_KEY,
         # The f32 reference: the expected texts are the f32 goldens, exactly.
         "--dtype", "float32"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
    )

    def output() -> str:
        log.seek(0)
        return log.read().decode(errors="replace")[-8000:]

    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tpuserve exited ({proc.returncode}):\n{output()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"tpuserve did not open its port:\n{output()}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server, api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(client):
    models = client.models.list().data
    assert len(models) == 1
    assert models[0].max_model_len == MAX_MODEL_LEN  # vLLM's extra field
    return models[0].id


@pytest.fixture(scope="module")
def goldens():
    g = json.loads(GOLDENS.read_text())
    return {c["name"]: c for c in g["cases"]}


def test_completion_text_prompt_matches_golden(client, model, goldens):
    case = goldens["short_english"]
    r = client.completions.create(
        model=model, prompt=case["prompt"], max_tokens=24, temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.id.startswith("cmpl-")
    assert r.object == "text_completion"
    assert r.model == model
    assert len(r.choices) == 1
    assert r.choices[0].text == case["completion_text"]
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(case["prompt_token_ids"])
    assert r.usage.completion_tokens == 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24


def test_completion_token_prompt_matches_golden(client, model, goldens):
    case = goldens["numbers_list"]
    r = client.completions.create(
        model=model, prompt=case["prompt_token_ids"], max_tokens=24, temperature=0,
        extra_body={"ignore_eos": True, "skip_special_tokens": False},
    )
    assert r.choices[0].text == case["completion_text"]


def test_completion_logprobs(client, model, goldens):
    case = goldens["short_english"]
    r = client.completions.create(
        model=model, prompt=case["prompt_token_ids"], max_tokens=24, temperature=0,
        logprobs=5, extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 24
    for i, (got, step) in enumerate(zip(lp.token_logprobs, case["steps"])):
        assert abs(got - step["logprob"]) <= TOL, f"step {i}: {got} vs {step['logprob']}"
        top = lp.top_logprobs[i]
        assert 1 <= len(top) <= 6
        # Greedy: the chosen token is the most likely one.
        assert got >= max(top.values()) - 1e-6
    # text_offset walks the generated text.
    assert lp.text_offset[0] == 0
    assert "".join(lp.tokens) == r.choices[0].text


def _chat_golden_content(case):
    return case["completion_text"].split("<|im_end|>")[0]


def test_chat_matches_golden(client, model, goldens):
    case = goldens["chat_single_turn"]
    r = client.chat.completions.create(
        model=model, messages=case["messages"], max_tokens=24, temperature=0,
    )
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant"
    assert msg.content == _chat_golden_content(case)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(case["prompt_token_ids"])


def test_streaming_chat(client, model, goldens):
    case = goldens["chat_single_turn"]
    stream = client.chat.completions.create(
        model=model, messages=case["messages"], max_tokens=24, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    content, roles, finish, usage, chunks = "", [], None, None, 0
    for chunk in stream:
        chunks += 1
        assert chunk.object == "chat.completion.chunk"
        assert chunk.id.startswith("chatcmpl-")
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            content += c.delta.content or ""
            if c.finish_reason:
                assert finish is None
                finish = c.finish_reason
    assert roles == ["assistant"]
    assert content == _chat_golden_content(case)
    assert finish == "stop"
    assert chunks > 3  # really streamed, token by token
    assert usage is not None and usage.prompt_tokens == len(case["prompt_token_ids"])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_logprobs(client, model, goldens):
    case = goldens["chat_single_turn"]
    r = client.chat.completions.create(
        model=model, messages=case["messages"], max_tokens=8, temperature=0,
        logprobs=True, top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    for i, (tok, step) in enumerate(zip(content, case["steps"])):
        assert abs(tok.logprob - step["logprob"]) <= TOL, f"step {i}"
        assert len(tok.top_logprobs) == 3
        assert tok.logprob >= max(t.logprob for t in tok.top_logprobs) - 1e-6
    # Entries cover every generated token, the final EOS included (as in vLLM).
    assert "".join(t.token for t in content).startswith(r.choices[0].message.content)


def test_n_equals_2(client, model):
    r = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=8, n=2, temperature=1.0, seed=7,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 16
    c = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say something."}],
        max_tokens=8, n=2, temperature=1.0, seed=7,
    )
    assert sorted(ch.index for ch in c.choices) == [0, 1]


def test_stop_strings(client, model, goldens):
    case = goldens["short_english"]
    golden = case["completion_text"]  # ' Paris.\n\nThe answer is: 2018-...'
    for stop in ["\n", "answer"]:
        r = client.completions.create(
            model=model, prompt=case["prompt"], max_tokens=24, temperature=0, stop=[stop],
        )
        ch = r.choices[0]
        assert ch.text == golden.split(stop)[0], stop
        assert ch.finish_reason == "stop"
        assert ch.model_extra.get("stop_reason") == stop  # vLLM's extra field
    r = client.completions.create(
        model=model, prompt=case["prompt"], max_tokens=24, temperature=0, stop=["answer"],
        extra_body={"include_stop_str_in_output": True},
    )
    assert r.choices[0].text == golden.split("answer")[0] + "answer"


def test_wrong_model_is_not_found(client):
    with pytest.raises(NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert e.value.status_code == 404
    with pytest.raises(NotFoundError):
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}])


def test_too_long_prompt_is_bad_request(client, model):
    with pytest.raises(BadRequestError) as e:
        client.completions.create(model=model, prompt="word " * 400, max_tokens=16)
    assert e.value.status_code == 400
    assert str(MAX_MODEL_LEN) in str(e.value)
    with pytest.raises(BadRequestError):
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "word " * 400}])
    with pytest.raises(BadRequestError):
        client.completions.create(model=model, prompt="hi", max_tokens=2, temperature=-1)


def test_bad_api_key_is_authentication_error(server, model):
    bad = OpenAI(base_url=server, api_key="wrong-key", max_retries=0, timeout=60)
    with pytest.raises(AuthenticationError) as e:
        bad.completions.create(model=model, prompt="hi", max_tokens=2)
    assert e.value.status_code == 401
    with pytest.raises(AuthenticationError):
        bad.models.list()



def test_completion_without_max_tokens_generates_16_like_vllm(client, model, server):
    """vLLM's (and OpenAI's) completions default: `max_tokens` left out → 16 tokens, an
    explicit `null` too (vLLM 0.32's `normalize_null_max_tokens`)."""
    r = client.completions.create(
        model=model, prompt="Once upon a time", temperature=0, extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 16, r
    assert r.choices[0].finish_reason == "length"
    import urllib.request
    req = urllib.request.Request(
        f"{server}/completions",
        data=json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": None,
                         "temperature": 0, "ignore_eos": True}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
    )
    v = json.loads(urllib.request.urlopen(req, timeout=300).read())
    assert v["usage"]["completion_tokens"] == 16, v


def test_max_tokens_past_the_context_is_capped_as_vllm(client, model):
    """vLLM 0.32 (`get_max_tokens`): a prompt that fits may ask for more tokens than the
    context has left; the answer runs to the end of the context and ends with `length`. More
    than the whole context, or a prompt longer than it, is a 400 naming the field."""
    r = client.completions.create(model=model, prompt="word " * 200, max_tokens=200,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens + r.usage.completion_tokens == MAX_MODEL_LEN, r.usage
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(BadRequestError) as e:
        client.completions.create(model=model, prompt="hi", max_tokens=MAX_MODEL_LEN + 1)
    assert f"max_tokens={MAX_MODEL_LEN + 1} cannot be greater than max_model_len" in str(e.value)
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=MAX_MODEL_LEN + 1)
    assert e.value.param == "max_completion_tokens" and "max_completion_tokens=" in str(e.value)
    with pytest.raises(BadRequestError) as e:
        client.completions.create(model=model, prompt="word " * 400, max_tokens=2)
    assert e.value.param == "input_tokens" and "even without any output tokens" in str(e.value)
