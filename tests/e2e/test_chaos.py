"""`luvmm bench chaos`, bounded: every kind of fault during live updates of
two VMs -- the agent, a VMM or both killed at a random moment, a stalled
step, a full disk -- and no VM is lost, no update is left stuck, no DMA is
damaged (an update may fail: it is rolled back)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.timeout(600)
def test_chaos_loses_no_vm_and_leaves_no_update_stuck(kvm_ok, tmp_path):
    out = tmp_path / "chaos.json"
    proc = subprocess.run([sys.executable, "-m", "luvmm", "bench", "chaos", "--cycles", "12", "--json", str(out)],
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "VMs lost: 0," in proc.stdout, proc.stdout  # and the text, as without --json
    result = json.loads(out.read_text())
    kinds = [a for a, n in result["actions"].items() if n]
    assert len(kinds) == (6 if result["full_disk"] else 5), result["actions"]  # every kind of fault happened
    assert result["every_vm_survived"] and result["vms_lost"] == [] and result["counters_went_back"] == []
    assert result["stuck_updates"] == 0
    assert result["dma_errors"] == result["dma_lost"] == result["dma_corrupted"] == 0
    assert result["guest_dma_errors"] == result["guest_verify_failures"] == 0
    assert result["updates_ok"] >= 1 and result["updates_ok"] + result["updates_failed"] == 12
