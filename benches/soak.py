#!/usr/bin/env python3
"""Soak: steady streaming load on a real `tpuserve serve` for a fixed time, sampling the
server's RSS, open file descriptors, request gauges and KV usage every few seconds. A leak
shows as a rising RSS or fd curve; a stuck queue as gauges that do not return to zero.

    benches/soak.py --minutes 10            # the nightly length
    benches/soak.py --minutes 30 --out DIR  # the by-hand length

The load: --concurrency clients in a loop, each streaming a completion (random prompt length
and max_tokens); one request in eight is abandoned mid-stream, one in sixteen is a bad request
(400), so abort and error paths run all along. Writes soak.csv (one row per sample) and
soak.md (the summary) under --out, and prints the summary. Exits non-zero when the server
died, a request was lost (neither tokens nor an error), or the gauges did not drain.
"""

import argparse
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a ship tree star river stone light city song road winter bird".split()


def metric(port: int, name: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    m = re.search(r"^" + re.escape(name) + r"(\{[^}]*\})? (\S+)$", text, re.M)
    return float(m.group(2)) if m else float("nan")


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Load:
    def __init__(self, port: int, seed: int):
        self.port = port
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"completed": 0, "abandoned": 0, "rejected": 0, "lost": 0, "tokens": 0}

    def count(self, key: str, n: int = 1):
        with self.lock:
            self.counts[key] += n

    def one(self, rng: random.Random):
        kind = rng.random()
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120)))
        body = {"prompt": prompt, "max_tokens": rng.randint(8, 96), "stream": True,
                "ignore_eos": True}
        if kind < 1 / 16:
            body["temperature"] = -1  # a 400, through the whole validation path
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        try:
            conn.request("POST", "/v1/completions", json.dumps(body).encode(),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status == 400:
                resp.read()
                self.count("rejected")
                return
            if resp.status != 200:
                self.count("lost")
                return
            abandon_at = rng.randint(1, 20) if kind > 1 - 1 / 8 else None
            chunks, done = 0, False
            for line in resp:
                if line.startswith(b"data: [DONE]"):
                    done = True
                    break
                if line.startswith(b"data: "):
                    chunks += 1
                    if abandon_at is not None and chunks >= abandon_at:
                        break
            if abandon_at is not None and not done:
                self.count("abandoned")
            elif done:
                self.count("completed")
                self.count("tokens", chunks)
            else:
                self.count("lost")
        except (OSError, http.client.HTTPException):
            self.count("lost")
        finally:
            conn.close()

    def run(self, deadline: float, concurrency: int):
        def worker(seed):
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                self.one(rng)

        threads = [threading.Thread(target=worker, args=(self.rng.randint(0, 2**31),))
                   for _ in range(concurrency)]
        for t in threads:
            t.start()
        return threads


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--interval", type=float, default=10, help="seconds between samples")
    ap.add_argument("--out", type=Path, default=ROOT / "benches" / "results" / "soak")
    ap.add_argument("--bin", default=os.environ.get(
        "TPUSERVE_BIN", str(Path.home() / ".cache/tpuserve/target/release/tpuserve")))
    ap.add_argument("serve_args", nargs="*",
                    help="extra `tpuserve serve` arguments (default: --kv-cache-space 0.25)")
    a = ap.parse_args()
    # KV pages are touched lazily, block by block, so RSS climbs until every block has been
    # used once (1 GiB by default). A 0.25 GiB cache is fully touched within the first
    # minutes; growth after that is a leak, not warm-up.
    a.serve_args = a.serve_args or ["--kv-cache-space", "0.25"]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a.out.mkdir(parents=True, exist_ok=True)
    log = open(a.out / "soak-server.log", "w")
    proc = subprocess.Popen([a.bin, "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--max-num-seqs", str(max(8, a.concurrency)), *a.serve_args],
                            stdout=log, stderr=subprocess.STDOUT)
    while True:
        if proc.poll() is not None:
            sys.exit(f"tpuserve exited at start-up ({proc.returncode}); see {log.name}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)

    load = Load(port, seed=1)
    t0 = time.monotonic()
    deadline = t0 + a.minutes * 60
    threads = load.run(deadline, a.concurrency)
    rows = []
    header = ["t_s", "rss_mib", "fds", "running", "waiting", "kv_usage", "completed",
              "abandoned", "rejected", "lost"]
    with open(a.out / "soak.csv", "w") as csv:
        csv.write(",".join(header) + "\n")
        while True:
            now = time.monotonic()
            if proc.poll() is not None:
                break
            row = [round(now - t0, 1), round(rss_mib(proc.pid), 1),
                   len(os.listdir(f"/proc/{proc.pid}/fd")),
                   metric(port, "vllm:num_requests_running"),
                   metric(port, "vllm:num_requests_waiting"),
                   round(metric(port, "vllm:kv_cache_usage_perc"), 4),
                   *(load.counts[k] for k in ("completed", "abandoned", "rejected", "lost"))]
            rows.append(row)
            csv.write(",".join(map(str, row)) + "\n")
            csv.flush()
            print("  ".join(f"{h}={v}" for h, v in zip(header, row)), flush=True)
            if now >= deadline:
                break
            time.sleep(min(a.interval, max(0.0, deadline - now)))
    for t in threads:
        t.join()
    # After the load: everything drains, and the idle server's footprint.
    drained = False
    for _ in range(60):
        if proc.poll() is not None:
            break
        if (metric(port, "vllm:num_requests_running") == 0
                and metric(port, "vllm:num_requests_waiting") == 0
                and metric(port, "vllm:kv_cache_usage_perc") == 0):
            drained = True
            break
        time.sleep(0.5)
    alive = proc.poll() is None
    idle = (round(rss_mib(proc.pid), 1), len(os.listdir(f"/proc/{proc.pid}/fd"))) if alive else None
    proc.terminate()
    proc.wait(timeout=60)

    # Until the KV cache has been touched once through, RSS climbs by design: compare from
    # the third minute on, where a leak would keep climbing and a warm server stays flat.
    warm = [r for r in rows if r[0] >= min(120, a.minutes * 30)] or rows
    rss = [r[1] for r in warm]
    fds = [r[2] for r in warm]
    n = len(warm)
    xs = [r[0] / 60 for r in warm]
    mx, my = sum(xs) / n, sum(rss) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, rss)) / var if var else 0.0
    c = load.counts
    summary = [
        f"# Soak: {a.minutes:g} min, {a.concurrency} streaming clients "
        f"({' '.join(a.serve_args) or 'default model, --device cpu'})",
        "",
        f"- requests: {c['completed']} completed ({c['tokens']} tokens streamed), "
        f"{c['abandoned']} abandoned mid-stream, {c['rejected']} rejected (400), "
        f"**{c['lost']} lost**",
        f"- RSS from minute {warm[0][0] / 60:.0f}: {rss[0]:.0f} → {rss[-1]:.0f} MiB (min {min(rss):.0f}, "
        f"max {max(rss):.0f}; fitted slope {slope:+.2f} MiB/min)",
        f"- open fds from minute {warm[0][0] / 60:.0f}: {fds[0]} → {fds[-1]} (min {min(fds)}, max {max(fds)})",
        f"- after the load: gauges drained: {drained}; idle RSS / fds: {idle}",
        f"- server alive at the end: {alive}",
        "",
        "| minute | RSS MiB | fds | running | waiting | KV usage |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    last_minute = -1
    for r in rows:
        if int(r[0] // 60) != last_minute:
            last_minute = int(r[0] // 60)
            summary.append(f"| {r[0] / 60:.1f} | {r[1]:.0f} | {r[2]} | {r[3]:g} | {r[4]:g} "
                           f"| {r[5]:.2f} |")
    text = "\n".join(summary) + "\n"
    (a.out / "soak.md").write_text(text)
    print(text)
    if not alive or c["lost"] or not drained:
        sys.exit(1)


if __name__ == "__main__":
    main()
