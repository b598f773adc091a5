"""Shared by the HTTP-level tests: the release binary, a free loopback port, and a real
`tpuserve serve` process that is ready once its port accepts connections."""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"


def binary() -> str:
    """$TPUSERVE_BIN (scripts/test.sh sets it), else the release build in the target dir."""
    b = os.environ.get("TPUSERVE_BIN")
    if not b:
        target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
        b = os.path.join(target, "release", "tpuserve")
    if not os.path.isfile(b):
        raise RuntimeError(
            f"tpuserve binary not found at {b}: build it (cargo build --release -p tpuserve) "
            "and set TPUSERVE_BIN"
        )
    return b


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin_cpu_reference(args) -> list[str]:
    """`--dtype float32` added on the CPU runner when no `--dtype` is given: the tests compare
    with the f32 goldens exactly, and `auto` now keeps GGUF blocks in place (int8 activations,
    close to the goldens but not bit for bit). Other devices are left alone."""
    args = list(args)
    def flag(name):
        for i, a in enumerate(args):
            if a == name:
                return args[i + 1] if i + 1 < len(args) else ""
            if a.startswith(name + "="):
                return a.split("=", 1)[1]
        return None
    if flag("--dtype") is None and flag("--device") in (None, "cpu", "auto"):
        args += ["--dtype", "float32"]
    return args


class ServerProcess:
    """`tpuserve serve --host 127.0.0.1 --port <free> ARGS` with its output captured; the
    constructor returns once the port is open (start-up failures raise with the log)."""

    def __init__(self, *args: str, timeout: float = 240, env: dict | None = None):
        self.port = free_port()
        self.log = tempfile.TemporaryFile(mode="w+b")
        env = dict(os.environ, RUST_LOG="info", **(env or {}))
        env.pop("VLLM_API_KEY", None)
        self.proc = subprocess.Popen(
            [binary(), "serve", "--host", "127.0.0.1", "--port", str(self.port),
             *pin_cpu_reference(args)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                out = self.output()
                self.log.close()
                raise RuntimeError(f"tpuserve exited ({self.proc.returncode}):\n{out}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
            if time.monotonic() > deadline:
                self.close(check=False)
                raise RuntimeError(f"tpuserve did not open port {self.port}")

    def openai(self, timeout: float = 600):
        """The official client against this server's /v1 (no retries: a failure shows)."""
        from openai import OpenAI
        return OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused",
                      max_retries=0, timeout=timeout)

    def post(self, path: str, body: dict, timeout: float = 600):
        """POSTs JSON; returns (status, decoded body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, json.loads(data)

    def metric(self, name: str) -> float:
        """The value of an unlabelled-or-single-series metric on /metrics."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        m = re.search(r"^" + re.escape(name) + r"\{[^}]*\} (\S+)$", text, re.M)
        assert m, f"{name} missing"
        return float(m.group(1))

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-8000:]

    def fd_count(self) -> int:
        """Open file descriptors of the server process (sockets included)."""
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def close(self, check: bool = True, allowed_panic: str | None = None):
        """Kills the server; with `check`, asserts it was still alive and never panicked
        (except for panic messages containing `allowed_panic`)."""
        alive = self.proc.poll() is None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        out = self.output()
        self.log.close()
        if check:
            assert alive, f"the server died:\n{out}"
            lines = out.splitlines()
            for i, line in enumerate(lines):
                if "panicked" in line:
                    # Rust prints the panic message on the line after "panicked at".
                    where = " ".join(lines[i:i + 2])
                    assert allowed_panic and allowed_panic in where, out
