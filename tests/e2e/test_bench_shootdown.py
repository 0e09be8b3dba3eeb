"""`luvmm bench shootdown`, short: the VMM's own page-protection changes
reach the vCPU's CPU as TLB shootdowns -- the kernel counts them there while
it flips, (next to) none while it idles -- and the guest's pace is measured
in both; the cost itself is the benchmark's to give (docs/guest-path.md)."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.timeout(180)
def test_bench_shootdown_counts_the_shootdowns_into_the_vcpus_cpu(kvm_ok, tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs: one for the vCPU, one to send shootdowns from")
    out = tmp_path / "shootdown.json"
    proc = subprocess.run([sys.executable, "-m", "luvmm", "bench", "shootdown", "--rounds", "1", "--seconds", "0.5",
                           "--json", str(out)], capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    (row,) = json.loads(out.read_text())["rounds"]
    assert row["shootdowns"] > 100 and row["idle_shootdowns"] < row["shootdowns"] / 10
    assert row["idle_pace_hz"] > 0 and row["flipping_pace_hz"] > 0
