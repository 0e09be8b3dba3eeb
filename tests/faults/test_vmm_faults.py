"""A live update that fails leaves the VM as it was: rollback with the guest intact."""

import os
import random
import signal
import time

import pytest

from luvmm.liveupdate.agent_client import AgentError
from luvmm.liveupdate.update import update_once
from luvmm.metrics.vmm import UpdateStats
from luvmm.vmm import manage
from luvmm.vmm.config import VmConfig
from tests.support.helpers import units
from tests.support.vms import wait_for_progress, wait_for_restart


# The VM's device freezes fine; then the RAM memfd's freeze fails.
@pytest.mark.timeout(300)
@pytest.mark.parametrize("vm_host", [{"env": {"LUVMM_FAULTS": "freeze:memfd-v1=fail"}}], indirect=True)
@pytest.mark.parametrize("guest", ["firmware", "synthetic"])
def test_failed_freeze_rolls_back_with_the_guest_intact(vm_host, guest, request):
    if guest == "firmware":
        request.getfixturevalue("kvm_ok")
    state, host = vm_host
    manage.start(state, VmConfig("rb", memory=64 << 20, guest=guest), units(host))
    st = manage.status(state, "rb")
    with pytest.raises(AgentError) as e:
        update_once(state, timeout=30)
    assert "kexec failed" in str(e.value) and "injected fault" in str(e.value)
    status = host.call({"op": "status"})[0]
    assert status["kexec_count"] == 0 and status["kernel"]["generation"] == 1
    # The VM resumed where it was: same process, counters going on, no DMA lost or wrong.
    after = wait_for_progress(state, "rb", manage.status(state, "rb")["mailbox"])
    now = manage.status(state, "rb")
    assert now["pid"] == st["pid"] and now["crash"] is None
    assert after["errors"] == 0 and after["verify_failures"] == 0
    assert status["kernel"]["vfio"][0]["msix_vectors"] == list(range(9))  # interrupts re-armed
    # Counted for Prometheus as a rollback, not a success.
    stats = UpdateStats.load(str(state.vm_dir("rb") / "metrics.json"))
    assert stats.updates == {"success": 0, "rolled_back": 1} and stats.blackout.count == 0


@pytest.mark.timeout(300)
def test_vmm_killed_after_prepare_comes_back_from_its_session(vm_host):
    """The VMM dies between saying ready and the kexec: its files stay
    preserved (LUO holds them), and the VMM that init starts after the kexec
    restores the VM from its session with nothing lost."""
    state, host = vm_host
    manage.start(state, VmConfig("killed", memory=64 << 20, guest="synthetic"), units(host),
                 env={"LUVMM_VMM_FAULT": "die-after-prepare"})
    record = update_once(state, timeout=60)
    log = (state.logs / "vm-killed.log").read_text()
    assert "fault injection: the VMM exits after preparing" in log  # it did die before the kexec
    report = record["reports"]["killed"]
    assert report["guest_progressed"] and report["crash"] is None
    assert (report["dma_errors"], report["dma_lost"], report["dma_corrupted"]) == (0, 0, 0)
    assert report["mailbox_after"]["completed"] > report["mailbox_at_pause"]["completed"]


def test_a_vm_that_cannot_start_leaves_nothing_behind(vm_host):
    state, host = vm_host
    manage.start(state, VmConfig("first", memory=64 << 20, guest="synthetic"), units(host))
    with pytest.raises(manage.VmError, match="every DSA of the host is passed through"):
        manage.start(state, VmConfig("second", memory=64 << 20, guest="synthetic"), units(host))
    assert manage.names(state) == ["first"]
    assert not state.vm_dir("second").exists()
    # The host can still update the VM that runs.
    record = update_once(state, timeout=60)
    assert record["vms"] == ["first"] and record["reports"]["first"]["guest_progressed"]


@pytest.mark.timeout(300)
def test_vmm_killed_while_running_comes_back_on_its_ram_and_device(kvm_ok, vm_host):
    """SIGKILL the VMM at random moments: init starts it again, it picks up the
    RAM, iommufd and device from the agent's fd store, the firmware recovers
    from what it keeps in RAM, and nothing is lost -- the device went on with
    its DMA while no VMM existed."""
    state, host = vm_host
    manage.start(state, VmConfig("phoenix", memory=64 << 20), units(host))
    rng = random.Random(5)
    st = manage.status(state, "phoenix")
    for kills in range(1, 4):
        before = wait_for_progress(state, "phoenix", st["mailbox"])
        time.sleep(rng.uniform(0.0, 0.3))  # where in its loop the guest is when its VMM dies
        killed_at = time.time()
        os.kill(st["pid"], signal.SIGKILL)
        st = wait_for_restart(state, "phoenix", st["pid"])
        assert st["boot"] == "restart" and st["crash"] is None
        during = host.call({"op": "observe", "bdf": st["bdf"], "t0": killed_at, "t1": killed_at + 0.03})[0]
        assert during["completions"] > 0  # DMA went on with no VMM at all
        after = wait_for_progress(state, "phoenix", st["mailbox"])
        assert after["recoveries"] == kills
        for counter in ("heartbeat", "submitted", "completed", "descs_ok"):
            assert after[counter] > before[counter]  # from where they were, not from zero
        assert after["errors"] == 0 and after["verify_failures"] == 0
        assert after["submitted"] - after["completed"] == after["inflight"]  # no batch lost
    unit_table = {u["name"]: u for u in host.call({"op": "units"})[0]}
    assert unit_table["vm-phoenix"]["restarts"] == 3
    # And it still live-updates, with nothing lost.
    report = update_once(state, timeout=60)["reports"]["phoenix"]
    assert report["guest_progressed"] and (report["dma_errors"], report["dma_lost"], report["dma_corrupted"]) == (0, 0, 0)


@pytest.mark.timeout(300)
def test_vmm_killed_in_prepare_rolls_back_and_comes_back(kvm_ok, vm_host):
    """The VMM dies with its vCPUs paused, before it saved anything: the update
    is rolled back (no kexec), init restarts the VMM on the VM's files, and the
    next update goes through."""
    state, host = vm_host
    manage.start(state, VmConfig("paused", memory=64 << 20), units(host), env={"LUVMM_VMM_FAULT": "die-in-prepare"})
    st = manage.status(state, "paused")
    before = wait_for_progress(state, "paused", st["mailbox"])
    with pytest.raises(AgentError, match="prepare failed, update rolled back"):
        update_once(state, timeout=60)
    assert host.call({"op": "status"})[0]["kexec_count"] == 0
    st = wait_for_restart(state, "paused", st["pid"])
    after = wait_for_progress(state, "paused", st["mailbox"])
    assert after["recoveries"] == 1 and after["completed"] > before["completed"]
    assert after["errors"] == 0 and after["verify_failures"] == 0
    assert after["submitted"] - after["completed"] == after["inflight"]
    report = update_once(state, timeout=60)["reports"]["paused"]
    assert report["guest_progressed"] and (report["dma_errors"], report["dma_lost"], report["dma_corrupted"]) == (0, 0, 0)
