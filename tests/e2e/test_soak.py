"""`luvmm bench soak` at a small size: live updates in a row damage nothing and leak nothing."""

import json
import subprocess
import sys

import pytest


@pytest.mark.timeout(600)
def test_soak_has_no_dma_damage_and_no_leak():
    proc = subprocess.run([sys.executable, "-m", "luvmm", "bench", "soak", "--cycles", "8", "--memory", "64M"],
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 failed" in proc.stdout and "leaked 0" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "luvmm", "bench", "soak", "--cycles", "8", "--memory", "64M",
                           "--json"], capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert {"cycles", "dma_errors", "dma_lost", "dma_corrupted", "fds_leaked", "rss_growth_bytes",
            "blackout_s"} <= set(result)
    assert result["cycles"] == result["completed"] == 8 and result["failed_updates"] == []
    assert result["dma_errors"] == result["dma_lost"] == result["dma_corrupted"] == 0
    assert result["dma_completed_during_blackout_min"] > 0 and result["guest_progressed_every_cycle"]
    assert result["fds_leaked"] == 0
    daemon = result["daemon"]
    assert daemon["after"]["sessions"] == daemon["before"]["sessions"]
    assert result["rss_growth_bytes"] < 32 << 20  # the bound of the daemon's bounded histories
    b = result["blackout_s"]
    assert 0 < b["p50"] <= b["p99"] <= b["max"] < 10
