"""Slow and silent clients (slowloris) against a real `tpuserve serve`: connections that send
nothing, headers that trickle in, bodies that trickle in, and idle keep-alive connections are
all closed by the server within its timeouts, while a good request is served meanwhile, and no
socket is left open afterwards."""

import http.client
import json
import socket
import threading
import time

from tpuserve_proc import SHARED, ServerProcess

GOLDENS = json.loads((SHARED / "fixtures" / "smollm2" / "goldens.json").read_text())
HEAD_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
SLACK = 3.0


def closed_by_server(sock: socket.socket, deadline: float, trickle: bytes = b"") -> tuple[bool, bytes]:
    """Keeps sending `trickle` one byte every 0.3 s (if any) until the server closes the
    connection or `deadline` passes; returns (closed, bytes received)."""
    got = b""
    sock.settimeout(0.3)
    sent = 0
    while time.monotonic() < deadline:
        if sent < len(trickle):
            try:
                sock.sendall(trickle[sent:sent + 1])
                sent += 1
            except OSError:
                return True, got
        try:
            chunk = sock.recv(4096)
        except socket.timeout:
            continue
        except OSError:
            return True, got
        if not chunk:
            return True, got
        got += chunk
    return False, got


def good_request(port):
    case = next(c for c in GOLDENS["cases"] if c["kind"] == "text")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({
        "prompt": case["prompt_token_ids"], "temperature": 0, "ignore_eos": True,
        "skip_special_tokens": False, "max_tokens": len(case["completion_token_ids"]),
    }).encode(), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 200, body
    assert body["choices"][0]["text"] == case["completion_text"]


def test_slowloris_connections_are_closed_and_good_requests_still_served():
    s = ServerProcess("--timeout-keep-alive", str(HEAD_TIMEOUT),
                      "--body-read-timeout", str(BODY_TIMEOUT))
    try:
        good_request(s.port)  # warm up, and the fd baseline includes any lazily opened file
        time.sleep(HEAD_TIMEOUT + 0.5)
        baseline = s.fd_count()

        kinds = ["silent", "trickled-head", "trickled-body"] * 40
        body = json.dumps({"prompt": "Hello", "max_tokens": 2}).encode()
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\n")
        full_head = head + f"Content-Length: {len(body)}\r\n\r\n".encode()
        socks = []
        for k in kinds:
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            if k == "trickled-head":
                sock.sendall(head[:20])
            elif k == "trickled-body":
                sock.sendall(full_head)
            socks.append(sock)
        opened = time.monotonic()
        while s.fd_count() < baseline + len(socks) and time.monotonic() < opened + 1:
            time.sleep(0.05)
        assert s.fd_count() >= baseline + len(socks), "the connections were not accepted"

        # 120 slow connections held open do not stop a good request.
        good_request(s.port)

        results = [None] * len(socks)

        def watch(i):
            trickle = {"trickled-head": head[20:] + b"X-Slow: " + b"a" * 100,
                       "trickled-body": body}.get(kinds[i], b"")
            results[i] = closed_by_server(socks[i], opened + HEAD_TIMEOUT + SLACK, trickle)

        threads = [threading.Thread(target=watch, args=(i,)) for i in range(len(socks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for kind, (closed, got) in zip(kinds, results):
            assert closed, f"a {kind} connection was still open after {HEAD_TIMEOUT + SLACK} s"
            if kind == "trickled-body":
                # The body deadline answers before closing.
                assert got.startswith(b"HTTP/1.1 408"), got[:200]
                err = json.loads(got.split(b"\r\n\r\n", 1)[1])
                assert err["error"]["code"] == 408 and "did not arrive" in err["error"]["message"]
        for sock in socks:
            sock.close()

        # An idle keep-alive connection after a complete exchange is closed as well.
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("GET", "/health")
        r = conn.getresponse()
        r.read()
        assert r.status == 200 and r.getheader("connection", "").lower() != "close"
        t0 = time.monotonic()
        closed, _ = closed_by_server(conn.sock, t0 + HEAD_TIMEOUT + SLACK)
        assert closed, "the idle keep-alive connection was never closed"
        assert time.monotonic() - t0 >= HEAD_TIMEOUT * 0.8, "closed before the keep-alive timeout"
        conn.close()

        good_request(s.port)
        deadline = time.monotonic() + 10
        while s.fd_count() > baseline and time.monotonic() < deadline:
            time.sleep(0.2)
        assert s.fd_count() <= baseline, "sockets left open"
    finally:
        s.close()


def test_timeouts_are_validated():
    for flag, value in [("--timeout-keep-alive", "0"), ("--body-read-timeout", "-1"),
                        ("--timeout-keep-alive", "nan")]:
        try:
            ServerProcess(f"{flag}={value}", timeout=30)
        except RuntimeError as e:
            assert flag in str(e) and "exited (2)" in str(e), str(e)
        else:
            raise AssertionError(f"{flag} {value} was accepted")
