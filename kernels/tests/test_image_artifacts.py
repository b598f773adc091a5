"""The artifacts the TPU image carries (docker/build-attention-kernels.sh, run by the
Dockerfile's attention-kernels stage) are the ones the runner looks up for the serving flags
they were built for: one per kernel shape `tpuserve plan --attention-shapes` lists, each found
when the step programs are compiled for v6e with the kernel spliced in (libtpu inside
`unshare -n`, as `plan --cost` runs it). tests/python/test_deploy.py checks that the
tpu-v6e-8-pallas overlay passes the same flags."""

import json
import os
import pathlib
import re
import subprocess

from test_splice import ROOT, tpuserve

CONFIGS = ROOT / "docker" / "attention-kernels"


def _flags(d: pathlib.Path) -> list:
    return [l.strip() for l in (d / "flags").read_text().splitlines()
            if l.strip() and not l.strip().startswith("#")]


def test_image_build_writes_the_artifacts_the_runner_looks_up(tmp_path):
    env = dict(os.environ, TPUSERVE_BIN=str(tpuserve()))
    out = tmp_path / "kernels"
    subprocess.run([str(ROOT / "docker/build-attention-kernels.sh"), str(out)], env=env,
                   check=True, capture_output=True, timeout=600)
    configs = sorted(d for d in CONFIGS.iterdir() if d.is_dir())
    assert [d.name for d in configs] == sorted(p.name for p in out.iterdir())
    for d in configs:
        args = ["--model", str(d / "config.json"), *_flags(d)]
        r = subprocess.run([str(tpuserve()), "plan", *args, "--attention-shapes"],
                           capture_output=True, text=True, check=True, timeout=120)
        shapes = json.loads(r.stdout)
        written = sorted(p.name for p in (out / d.name).glob("paged_attention-*.json"))
        assert len(written) == len(shapes) > 0, (written, shapes)
        for p in written:
            art = json.loads((out / d.name / p).read_text())
            assert art["shape"] in shapes, p
            assert art["target"].startswith("TPU"), art["target"]
        # The runner finds them: a prompt and a decode bucket compiled for v6e with the
        # kernel spliced in (the kernels stage compiles every bucket of other configurations).
        r = subprocess.run([str(tpuserve()), "plan", *args, "--cost", "--no-step-model",
                            "--bucket", "512:16", "--bucket", "128:1",
                            "--attention-backend", "pallas",
                            "--attention-kernels", str(out / d.name)],
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert re.search(rf"attention: the Pallas kernel \(2 artifacts from {re.escape(str(out / d.name))}\)",
                         r.stdout), r.stdout
        assert "fits: yes" in r.stdout, r.stdout
