"""`benches/vllm_diff` (the same requests to vLLM and tpuserve, every difference listed) runs
end to end, and its differ finds what differs: here tpuserve against itself (no vLLM in CI),
which must answer every case the same — the harness, and that greedy answers, errors and
response shapes do not depend on the run."""

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys

from tpuserve_proc import ROOT, binary


def load_tool():
    loader = importlib.machinery.SourceFileLoader("vllm_diff", str(ROOT / "benches/vllm_diff"))
    spec = importlib.util.spec_from_loader("vllm_diff", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def test_the_differ_names_every_kind_of_difference():
    d = load_tool().diff
    assert d({"a": 1, "id": "x"}, {"a": 1, "id": "y"}) == []
    assert d({"a": 1.0}, {"a": 1.0005}) == []
    out = d({"a": 1.0, "b": [1, 2], "c": None, "s": "x", "fp": "v"},
            {"a": 1.5, "b": [1], "c": 3, "t": True, "s": "y", "fp": "w"})
    joined = "\n".join(out)
    for needle in [".a: 1.0 in the reference, 1.5", ".b: 2 items in the reference, 1",
                   ".c: NoneType", ".s: \"x\"", ".t: only tpuserve", ".fp: \"v\""]:
        assert needle in joined, (needle, out)
    assert d({"system_fingerprint": "vllm"}, {"system_fingerprint": "tpuserve"}) == []
    assert d({"system_fingerprint": "vllm"}, {}) != []
    assert d([True], [1]) != [] and d([1], [1.0]) == []


def test_tpuserve_answers_every_case_as_itself(tmp_path):
    env = dict(os.environ, TPUSERVE_BIN=binary())
    p = subprocess.run([sys.executable, str(ROOT / "benches" / "vllm_diff"), "--reference",
                        "tpuserve", "--fail-on-diff", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    tool = load_tool()
    assert [r["case"] for r in res] == [c[0] for c in tool.CASES]
    assert all(r["diffs"] == [] for r in res)
    statuses = {r["case"]: r["status"][0] for r in res}
    # The cases cover answers and refusals both.
    assert statuses["completion greedy"] == 200 and statuses["completion prompt too long"] == 400
    assert statuses["completion unknown model"] == 404
    n = len(tool.CASES)
    assert f"{n} of {n} cases answered the same (reference: tpuserve)" in p.stdout, p.stdout[-500:]
