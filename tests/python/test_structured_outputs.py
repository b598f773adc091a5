"""Issue 19: structured outputs through a real `tpuserve serve` (SmolLM2), on the CPU runner
and on the XLA runner (`--device xla-cpu`), with the official `openai` client and raw HTTP.

Every constrained output is checked by an independent validator: `jsonschema` for JSON
schemas, Python's `re.fullmatch` for regexes, `lark` for grammars. Plain requests sharing a
batch with constrained ones must still equal their goldens token for token.
"""

import concurrent.futures as cf
import json
import os
import random
import re
import time

import jsonschema
import lark
import pytest
from pydantic import BaseModel, Field

from tpuserve_proc import SHARED, ServerProcess

GOLDENS = json.loads((SHARED / "fixtures" / "smollm2" / "goldens.json").read_text())
XLA_CACHE_ENV = "TPUSERVE_XLA_TEST_CACHE"


Server = ServerProcess


def start(device: str, *extra: str) -> Server:
    args = ["--max-model-len", "512", "--max-num-seqs", "32", "--max-num-batched-tokens", "64",
            *extra]
    env = {}
    if device == "xla-cpu":
        args += ["--device", "xla-cpu"]
        cache = os.environ.get(XLA_CACHE_ENV)
        if cache:
            env["VLLM_XLA_CACHE_PATH"] = cache + "/structured"
    return Server(*args, timeout=600, env=env)


@pytest.fixture(scope="module", params=["cpu", "xla-cpu"])
def server(request):
    s = start(request.param)
    s.device = request.param
    yield s
    s.close()


def parallel(fn, items, workers=16):
    with cf.ThreadPoolExecutor(workers) as ex:
        return list(ex.map(fn, items))


# ---- generated JSON schemas ------------------------------------------------------------


def gen_schema(rng: random.Random, depth: int = 0) -> dict:
    """Nested objects, bounded arrays, enums, required fields, ranged numbers, patterned and
    bounded strings: every schema has finite outputs, so a complete answer always fits."""
    kinds = ["string", "pattern", "integer", "number", "boolean", "enum"]
    if depth < 2:
        kinds += ["object", "array"]
    k = rng.choice(kinds)
    if k == "string":
        return {"type": "string", "maxLength": rng.randint(1, 12)}
    if k == "pattern":
        return {"type": "string",
                "pattern": rng.choice(["^[a-z]{1,6}$", "^[A-Z][0-9]{2}$", "^(ab|cd){1,3}$"])}
    if k == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 100)}
    if k == "number":
        return {"type": "number", "minimum": -5, "maximum": 5}
    if k == "boolean":
        return {"type": "boolean"}
    if k == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, None, True], rng.randint(1, 4))}
    if k == "array":
        lo = rng.randint(0, 1)
        return {"type": "array", "items": gen_schema(rng, depth + 1), "minItems": lo,
                "maxItems": lo + rng.randint(0, 2)}
    return gen_object(rng, depth + 1)


def gen_object(rng: random.Random, depth: int = 0) -> dict:
    names = rng.sample(["id", "name", "tags", "score", "ok", "kind", "meta", "items"],
                       rng.randint(1, 4))
    props = {n: gen_schema(rng, depth) for n in names}
    required = [n for n in names if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False}


SCHEMAS = [gen_object(random.Random(i)) for i in range(50)]


def chat_json(s: Server, schema: dict, temperature: float, seed: int | None,
              max_tokens: int = 400):
    body = {
        "messages": [{"role": "user", "content": "Reply with a JSON object."}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "answer", "schema": schema, "strict": True}},
    }
    if seed is not None:
        body["seed"] = seed
    return s.post("/v1/chat/completions", body)


def check_json(schema: dict, st: int, r: dict):
    assert st == 200, r
    choice = r["choices"][0]
    text = choice["message"]["content"]
    assert choice["finish_reason"] == "stop", (schema, text)
    jsonschema.validate(json.loads(text), schema)


def test_fifty_schemas_greedy_and_sampled(server):
    jobs = [(sc, 0.0, None) for sc in SCHEMAS]
    jobs += [(sc, 1.0, seed) for sc in SCHEMAS for seed in (11, 12)]
    results = parallel(lambda j: chat_json(server, *j), jobs)
    for (sc, _, _), (st, r) in zip(jobs, results):
        check_json(sc, st, r)


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    languages: list[str] = Field(max_length=3)


def test_openai_parse_with_pydantic_model(server):
    c = server.openai()
    r = c.chat.completions.parse(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "Describe a programmer as JSON."}],
        response_format=Person, max_tokens=200, temperature=0)
    p = r.choices[0].message.parsed
    assert isinstance(p, Person), r
    assert 0 <= p.age <= 120 and len(p.languages) <= 3


REGEXES = [
    r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)", r"[A-Z][a-z]{2,8}", r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
    r"[a-f0-9]{8}", r"(cat|dog)s?", r"-?[0-9]{1,5}(\.[0-9]{1,3})?",
    r"[a-z]{1,10}@[a-z]{1,10}\.(com|org)", r"https://[a-z]{3,10}\.com/[a-z0-9]{0,8}",
    r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}", r"[A-Z]{2}[0-9]{2} [A-Z]{3}", r"(true|false)",
    r"#[0-9a-fA-F]{6}", r"[01]{8}", r"(Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day",
    r"v[0-9]\.[0-9]{1,2}\.[0-9]{1,2}", r"[a-z]{3,6}( [a-z]{3,6}){0,3}", r"(\+|-)[0-9]{2}:[0-9]{2}",
    r"[A-Za-z]{1,4}[0-9]{1,4}", r"(0|[1-9][0-9]{0,3})",
]


def test_regexes_fullmatch(server):
    regexes = REGEXES if server.device == "cpu" else REGEXES[::4]
    jobs = [(rx, t) for rx in regexes for t in (0.0, 1.0)]

    def run(job):
        rx, t = job
        return server.post("/v1/completions", {
            "prompt": "Here is an example:", "max_tokens": 60, "temperature": t, "seed": 5,
            "structured_outputs": {"regex": rx}})

    for (rx, _), (st, r) in zip(jobs, parallel(run, jobs)):
        assert st == 200, r
        text = r["choices"][0]["text"]
        assert r["choices"][0]["finish_reason"] == "stop", (rx, text)
        assert re.fullmatch(rx, text), (rx, text)


def test_choice_and_guided_choice(server):
    choices = ["Paris", "London", "New York", "東京"]
    bodies = [{"structured_outputs": {"choice": choices}}, {"guided_choice": choices}]
    for b in bodies:
        # n > 1 needs sampling (vLLM refuses n identical greedy answers).
        for t, n in ((0.0, 1), (1.0, 3)):
            st, r = server.post("/v1/completions", {
                "prompt": "The best city is", "max_tokens": 20, "temperature": t, "seed": 1,
                "n": n, **b})
            assert st == 200, r
            for c in r["choices"]:
                assert c["text"] in choices and c["finish_reason"] == "stop", r


# Sums of at most four products of at most three factors (bounded, so a sampled expression
# always ends within max_tokens); checked with the unbounded grammar of the same language.
ARITH_LARK = r"""
start: expr
expr: term (("+" | "-") term){0,3}
term: factor (("*" | "/") factor){0,2}
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
"""

ARITH_GBNF = r"""
root   ::= expr
expr   ::= term (("+" | "-") term){0,3}
term   ::= factor (("*" | "/") factor){0,2}
factor ::= [0-9] [0-9]? [0-9]? | "(" expr ")"
"""

PARSER = lark.Lark(r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]+/
""", parser="earley")


@pytest.mark.parametrize("grammar", [ARITH_LARK, ARITH_GBNF], ids=["lark", "gbnf"])
def test_grammar_outputs_parse(server, grammar):
    def run(seed):
        return server.post("/v1/completions", {
            "prompt": "An arithmetic expression:", "max_tokens": 120, "temperature": 1.0,
            "seed": seed, "structured_outputs": {"grammar": grammar}})

    for st, r in parallel(run, range(6)):
        assert st == 200, r
        text = r["choices"][0]["text"]
        assert r["choices"][0]["finish_reason"] == "stop", text
        PARSER.parse(text)


def test_mixed_batch_plain_outputs_stay_golden(server):
    cases = [c for c in GOLDENS["cases"] if c["kind"] == "text"]
    plain = [("plain", cases[i % len(cases)]) for i in range(16)]
    constrained = [("json", sc) for sc in SCHEMAS[:16]]
    jobs = [j for pair in zip(plain, constrained) for j in pair]
    assert len(jobs) == 32

    def run(job):
        kind, x = job
        if kind == "plain":
            return server.post("/v1/completions", {
                "prompt": x["prompt_token_ids"], "temperature": 0, "ignore_eos": True,
                "skip_special_tokens": False, "max_tokens": len(x["completion_token_ids"])})
        return chat_json(server, x, 0.0, None)

    for (kind, x), (st, r) in zip(jobs, parallel(run, jobs, workers=32)):
        if kind == "plain":
            assert st == 200, r
            assert r["choices"][0]["text"] == x["completion_text"], (x["name"], r)
        else:
            check_json(x, st, r)


def test_streaming_json_schema_assembles(server):
    c = server.openai()
    schema = SCHEMAS[3]
    stream = c.chat.completions.create(
        model="SmolLM2-135M-Instruct", stream=True, max_tokens=300, temperature=0,
        messages=[{"role": "user", "content": "Reply with JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    text, finish = "", None
    for chunk in stream:
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), schema)


BAD = [
    ({"structured_outputs": {"regex": "(unclosed"}}, "regex"),
    ({"structured_outputs": {"regex": "[z-a]"}}, "regex"),
    ({"structured_outputs": {"regex": "a{5,2}"}}, "regex"),
    ({"structured_outputs": {"regex": "(?<=a)b"}}, "look-behind"),
    ({"structured_outputs": {"regex": "(a)\\1"}}, "backreference"),
    ({"structured_outputs": {"regex": "((a{100}){100}){100}"}}, "nested repetition"),
    ({"structured_outputs": {"json": {"type": "nonsense"}}}, "bad type"),
    ({"structured_outputs": {"json": {"type": "integer", "minimum": 5, "maximum": 1}}}, "empty range"),
    ({"structured_outputs": {"json": {"$ref": "#/$defs/missing"}}}, "dangling $ref"),
    ({"structured_outputs": {"json": "{not json"}}, "schema text"),
    ({"structured_outputs": {"json": 42}}, "schema type"),
    ({"structured_outputs": {"json": {"type": "string", "minLength": 10, "maxLength": 2}}}, "lengths"),
    ({"structured_outputs": {"json": {"allOf": [{"type": "string"}, {"type": "integer"}]}}}, "unsatisfiable"),
    ({"structured_outputs": {"choice": []}}, "no choices"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "undefined rule"),
    ({"structured_outputs": {"grammar": "root ::= \"a"}}, "gbnf string"),
    ({"structured_outputs": {"grammar": "x ::= \"a\""}}, "gbnf no root"),
    ({"structured_outputs": {"grammar": ""}}, "empty grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "two kinds"),
    ({"structured_outputs": {}}, "no kind"),
    ({"response_format": {"type": "json_schema"}}, "json_schema missing"),
    ({"response_format": {"type": "xml"}}, "unknown type"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "two guided"),
    ({"guided_regex": "a", "guided_decoding_backend": "nope"}, "backend"),
    ({"structured_outputs": {"json": {"type": "object", "properties": {
        f"p{i}": {"$ref": f"#/$defs/d{i}"} for i in range(3000)}}}}, "huge schema"),
    ({"structured_outputs": {"grammar": "start: a\na: a \"x\""}}, "empty language"),
    ({"structured_outputs": {"grammar": 'start: %json {"type": "nonsense"}'}}, "lark %json"),
    ({"structured_outputs": {"grammar": "start: " + " ".join(["a"] * 3) + "\na: " +
                                       " | ".join(f'"{i}"' for i in range(50000))}}, "huge grammar"),
]


def test_bad_specs_are_quick_400s(server):
    for body, what in BAD:
        t0 = time.monotonic()
        st, r = server.post("/v1/completions", {"prompt": "x", "max_tokens": 5, **body})
        took = time.monotonic() - t0
        assert st == 400, (what, r)
        assert r["error"]["code"] == 400 and r["error"]["message"], (what, r)
        assert took < 15, (what, took)
    st, r = server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 3})
    assert st == 200, r


def test_preempted_constrained_requests_equal_their_unpreempted_runs():
    # A KV cache of a few sequences under 24 concurrent requests preempts; greedy outputs must
    # be those of the same requests run one at a time.
    s = Server("--max-model-len", "200", "--max-num-seqs", "32", "--kv-cache-space", "0.01",
               "--no-enable-prefix-caching")
    try:
        jobs = [("json", sc) for sc in SCHEMAS[20:32]] + [("regex", rx) for rx in REGEXES[:12]]

        def run(job):
            kind, x = job
            if kind == "json":
                return chat_json(s, x, 0.0, None, max_tokens=160)
            return s.post("/v1/completions", {
                "prompt": "Example: " * 30, "max_tokens": 60, "temperature": 0,
                "structured_outputs": {"regex": x}})

        alone = [run(j) for j in jobs]
        together = parallel(run, jobs, workers=24)
        assert s.metric("vllm:num_preemptions_total") > 0, "the cache was not under pressure"
        for j, (st1, r1), (st2, r2) in zip(jobs, alone, together):
            assert st1 == 200 and st2 == 200, (r1, r2)
            key = "message" if j[0] == "json" else None
            t1 = r1["choices"][0][key]["content"] if key else r1["choices"][0]["text"]
            t2 = r2["choices"][0][key]["content"] if key else r2["choices"][0]["text"]
            assert t1 == t2, (j, t1, t2)
            if j[0] == "json":
                check_json(j[1], st2, r2)
            else:
                assert re.fullmatch(j[1], t2)
    finally:
        s.close()
