#!/usr/bin/env python3
"""Minimal streaming load for an OpenAI-compatible /v1/completions endpoint (stdlib only, so it
runs on bare hosts such as the GPU machine): N concurrent clients, each sends fresh random-word
prompts with ignore_eos and a fixed max_tokens, and the script prints output tokens/s, TTFT and
TPOT medians. `tpuserve bench serve` is the full tool; this is for hosts without the binary's
peers installed.

usage: stream_load.py BASE_URL MODEL CONCURRENCY REQUESTS_PER_CLIENT [MAX_TOKENS]
"""
import json
import random
import statistics
import sys
import threading
import time
import http.client
from urllib.parse import urlparse

WORDS = ("alpha river stone cloud maple orbit lantern copper meadow signal harbor velvet "
         "summit ember willow quartz falcon prism tundra cobalt").split()


def one_request(url, model, max_tokens, rng):
    prompt = " ".join(rng.choice(WORDS) for _ in range(80))
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True})
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    stamps = []
    t_start = t0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
            stamps.append(time.perf_counter() - t0)
    conn.close()
    stamps.append(time.perf_counter() - t_start)  # last entry: end-to-end latency
    return stamps


def main():
    base, model, conc, per = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    max_tokens = int(sys.argv[5]) if len(sys.argv) > 5 else 64
    url = urlparse(base)
    results, errors = [], []

    def client(i):
        rng = random.Random(i * 7919 + int(time.time()))
        for _ in range(per):
            try:
                results.append(one_request(url, model, max_tokens, rng))
            except Exception as e:  # reported below; the run continues
                errors.append(str(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    e2e = [s[-1] for s in results]
    results = [s[:-1] for s in results]
    tokens = sum(len(s) for s in results)
    ttft = [s[0] for s in results if s]
    tpot = [(s[-1] - s[0]) / (len(s) - 1) for s in results if len(s) > 1]
    print(json.dumps({
        "concurrency": conc, "requests": len(results), "errors": len(errors),
        "output_tok_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(results) / wall, 2),
        "e2e_p50_ms": round(statistics.median(e2e) * 1e3, 1) if e2e else None,
        "ttft_p50_ms": round(statistics.median(ttft) * 1e3, 1) if ttft else None,
        "tpot_p50_ms": round(statistics.median(tpot) * 1e3, 2) if tpot else None,
        "first_error": errors[0] if errors else None,
    }))


if __name__ == "__main__":
    main()
