#!/usr/bin/env python3
"""Structured-output cost (issue 19): output tokens/s of all-constrained JSON-schema requests
against the same requests unconstrained, at 1 and 32 concurrent streams, and time to first
token with a schema the server has not seen (compiled on arrival) and with a cached one.

Starts `tpuserve serve` itself (SmolLM2, the default model) for each device given, one at a
time, on a free port; stdlib only.

usage: structured_outputs.py [--bin PATH] [--devices cpu,xla-cpu] [--requests-per-stream N]
"""
import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import tempfile
import threading
import time

PROMPT = "List sixteen numbers between 0 and 999 as JSON."
MAX_TOKENS = 64


def schema(tag: str) -> dict:
    # Sixteen bounded integers: about 60 tokens, so constrained answers run close to
    # MAX_TOKENS like the unconstrained ones (ignore_eos) they are compared with.
    return {"type": "object", "properties": {tag: {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
        "minItems": 16, "maxItems": 16}}, "required": [tag], "additionalProperties": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary: str, device: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    args = [binary, "serve", "--host", "127.0.0.1", "--port", str(port), "--max-model-len",
            "512", "--max-num-seqs", "32", "--max-num-batched-tokens", "128", "--device", device]
    proc = subprocess.Popen(args, stdout=tempfile.TemporaryFile(), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tpuserve exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("tpuserve did not start")


def one(port: int, constrained: bool, tag: str) -> tuple[float, float, int]:
    """(time to first token, end-to-end latency, completion tokens) of one streamed chat."""
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if constrained:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "n", "schema": schema(tag)}}
    else:
        body["ignore_eos"] = True
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    ttft, tokens = None, 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
            ttft = time.perf_counter() - t0
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    return ttft or 0.0, time.perf_counter() - t0, tokens


def load(port: int, conc: int, per: int, constrained: bool) -> dict:
    results, lock = [], threading.Lock()

    def client():
        for _ in range(per):
            r = one(port, constrained, "numbers")
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    toks = sum(r[2] for r in results)
    return {"tok_s": toks / wall, "tokens": toks, "requests": len(results),
            "ttft_p50_ms": 1000 * statistics.median(r[0] for r in results)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.environ.get("TPUSERVE_BIN", "tpuserve"))
    ap.add_argument("--devices", default="cpu,xla-cpu")
    ap.add_argument("--requests-per-stream", type=int, default=2)
    a = ap.parse_args()
    for device in a.devices.split(","):
        proc, port = start(a.bin, device)
        try:
            one(port, False, "warm")
            one(port, True, "numbers")  # compiles and caches the benchmark's schema
            print(f"== {device}")
            for conc in (1, 32):
                per = a.requests_per_stream if conc > 1 else 2 * a.requests_per_stream
                plain = load(port, conc, per, False)
                cons = load(port, conc, per, True)
                ratio = cons["tok_s"] / plain["tok_s"]
                print(f"  {conc:>2} streams: unconstrained {plain['tok_s']:7.1f} tok/s "
                      f"(TTFT p50 {plain['ttft_p50_ms']:6.0f} ms)  json-schema "
                      f"{cons['tok_s']:7.1f} tok/s (TTFT p50 {cons['ttft_p50_ms']:6.0f} ms)  "
                      f"ratio {ratio:.3f}  [{plain['tokens']} / {cons['tokens']} tokens]")
            fresh = [one(port, True, f"n{random.getrandbits(40):x}")[0] for _ in range(3)]
            cached = [one(port, True, "numbers")[0] for _ in range(3)]
            print(f"  TTFT, new schema (compiled on arrival): median "
                  f"{1000 * statistics.median(fresh):.0f} ms; cached schema: median "
                  f"{1000 * statistics.median(cached):.0f} ms")
        finally:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
