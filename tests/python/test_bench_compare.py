"""Issue 9: the smoke mode of `benches/compare` (tpuserve only, a few short requests) runs end
to end, so the script that produces benches/RESULTS.md never rots."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tpuserve_proc import ROOT, binary


def test_compare_smoke_runs_and_reports(tmp_path):
    env = dict(os.environ, TPUSERVE_BIN=binary())
    p = subprocess.run([sys.executable, str(ROOT / "benches" / "compare"), "--smoke",
                        "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["skipped"] == {}
    [server] = res["results"]
    assert server["server"] == "tpuserve-cpu"
    assert 0 < server["startup_s"] < 600
    assert server["rss_idle_bytes"] > 50 * 2**20
    points = {pt["concurrency"]: pt for pt in server["points"]}
    assert sorted(points) == [1, 2]
    for conc, pt in points.items():
        assert pt["failed"] == 0
        assert pt["completed"] == pt["num_prompts"] == 2
        # ignore_eos: every request produced exactly its 8 tokens, counted by the server
        assert pt["output_tokens_from_usage"] is True
        assert pt["output_tokens"] == 8 * pt["completed"]
        assert pt["output_tok_s"] > 0 and pt["ttft_p50_ms"] > 0 and pt["tpot_p50_ms"] > 0
        assert pt["rss_load_bytes"] >= server["rss_idle_bytes"] * 0.5
        assert pt["cpu_s_per_1k_tokens"] > 0
    # The CPU the run was on, with the vector flags that decide each server's kernels.
    flags = open("/proc/cpuinfo").read().split("\nflags", 1)[1].split("\n", 1)[0].split()
    assert res["machine"]["cpu_flags"] == sorted(
        f for f in flags if f == "avx2" or f.startswith(("avx512", "avx_vnni", "amx")))
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("| server | conc | out tok/s")
    assert f"CPU: {res['machine']['cpu_model']}, " in table
    assert all(f in table.rsplit("CPU: ", 1)[1] for f in res["machine"]["cpu_flags"])
    assert table.count("| tpuserve-cpu |") == 2
    assert (tmp_path / "tpuserve-cpu.log").read_text().strip()
