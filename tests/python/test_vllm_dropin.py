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
