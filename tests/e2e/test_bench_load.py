"""`luvmm bench load`, short: it measures the guest's pace idle and under
clients that scrape its metrics and ask its status, and prints both; the
figures themselves are the benchmark's to give (docs/performance.md), not this test's."""

import json
import subprocess
import sys

import pytest


@pytest.mark.timeout(180)
def test_bench_load_measures_the_guest_idle_and_under_load(kvm_ok, tmp_path):
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, "-m", "luvmm", "bench", "load", "--rounds", "1", "--seconds", "0.5",
                           "--clients", "4", "--json", str(out)], capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr
    assert "guest pace under load:" in proc.stdout and "Traceback" not in proc.stderr
    result = json.loads(out.read_text())
    assert result["clients"] == 4 and result["errors"] == 0
    assert result["scrapes"] > 0 and result["statuses"] > 0  # the clients were served
    assert len(result["idle_pace_hz"]) == len(result["loaded_pace_hz"]) == 1
    assert result["idle_pace_hz"][0] > 0 and result["loaded_pace_hz"][0] > 0 and result["ratio_mean"] > 0
