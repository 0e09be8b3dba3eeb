"""Fault injection at each step of a live update (luvmm.liveupdate.emu.faults), and the
outcome a user depends on for each: rollback with the VM intact, a clean
refusal that keeps the session for a retry, or a detected fault repaired.

Every test runs the real processes: host daemon, agent and VMM units."""

import errno
import os
import subprocess
import sys

import pytest

from luvmm.liveupdate.emu import faults
from luvmm.liveupdate.agent_client import AgentError
from luvmm.liveupdate.update import update_once
from luvmm.metrics.vmm import UpdateStats
from luvmm.vmm import manage

from tests.support.vms import wait_for_progress
from tests.support.vms import assert_clean, assert_intact, host_status, inject, start_vm, wait_until


# --- the specification ------------------------------------------------------------------------


def test_fault_specs_parse_and_bad_ones_say_why():
    rules = faults.parse("freeze:memfd-v1@a=fail, retrieve@b=kill:vm-b,kexec=stall:0.5,kho=truncate")
    assert [str(r) for r in rules] == ["freeze:memfd-v1@a=fail", "retrieve@b=kill:vm-b", "kexec=stall:0.5",
                                       "kho=truncate"]
    assert rules[0].matches("freeze", "memfd-v1", "a") and not rules[0].matches("freeze", "iommufd-v1", "a")
    for bad, why in (("freeze", "expected"), ("boot=fail", "unknown point"), ("freeze:nfs=fail", "handler"),
                     ("kho=fail", "corrupt, truncate"), ("finish=stall:-1", "SECONDS"), ("freeze=kill", "UNIT"),
                     ("kexec@a=stall:1", "session"), ("freeze=fail:now", "no argument")):
        with pytest.raises(faults.FaultSpecError, match=why):
            faults.parse(bad)


def test_faults_are_set_and_cleared_at_run_time(vm_host):
    state, conn = vm_host
    assert inject(conn) == []
    assert inject(conn, "finish=fail") == ["finish=fail"]
    with pytest.raises(OSError) as e:
        inject(conn, "finish=explode")
    assert e.value.errno == errno.EINVAL and "finish=explode" in str(e.value)
    assert host_status(conn)["faults"] == ["finish=fail"]  # a bad spec changed nothing
    cli = [sys.executable, "-m", "luvmm", "host", "faults", "--state-dir", state.path]
    out = subprocess.run(cli + ["--clear", "kexec=clear-bus-master"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["kexec=clear-bus-master"]
    bad = subprocess.run(cli + ["kexec=fail"], capture_output=True, text=True)
    assert bad.returncode == 2 and "at kexec the action is one of" in bad.stderr
    assert subprocess.run(cli + ["--clear"], capture_output=True, text=True).stdout.strip() == "no faults injected"


# --- preserve ---------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_failing_preserve_refuses_the_update_and_a_retry_succeeds(vm_host):
    """PRESERVE_FD of the device fails: the VM runs on, an update is refused
    before anything is paused, and once the fault is gone the same VMM
    preserves what was missing and the update goes through."""
    state, conn = vm_host
    inject(conn, "preserve:vfio-pci-v1=fail")
    st = start_vm(state, conn)
    assert "PRESERVE_FD failed" in st["preserve_error"]
    with pytest.raises(AgentError, match="not ready, nothing paused: f: PRESERVE_FD failed") as e:
        update_once(state, timeout=30)
    assert e.value.errno == errno.EIO and "LIVEUPDATE_SESSION_PRESERVE_FD" in str(e.value)
    assert host_status(conn)["kexec_count"] == 0
    assert_intact(state, "f", st)
    assert manage.status(state, "f")["updates_prepared"] == 0  # never paused
    inject(conn, clear=True)
    report = update_once(state, timeout=60)["reports"]["f"]
    assert_clean(report)
    assert manage.status(state, "f")["preserve_error"] is None


# --- freeze -----------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("handler", ["vfio-pci-v1", "iommufd-v1"])
def test_a_failing_freeze_rolls_back(vm_host, handler):
    """(memfd-v1: tests/faults/test_vmm_faults.py.)  The reboot fails, the files frozen
    before are unfrozen, the VM resumes with its interrupts re-armed."""
    state, conn = vm_host
    st = start_vm(state, conn)
    inject(conn, f"freeze:{handler}=fail")
    with pytest.raises(AgentError, match=f"kexec failed.*injected fault: freeze of {handler}"):
        update_once(state, timeout=30)
    status = host_status(conn)
    assert status["kexec_count"] == 0 and status["kexec_refused"] == 1
    assert status["kernel"]["vfio"][0]["msix_vectors"] == list(range(9))
    assert_intact(state, "f", st)
    stats = UpdateStats.load(str(state.vm_dir("f") / "metrics.json"))
    assert stats.updates == {"success": 0, "rolled_back": 1}
    inject(conn, clear=True)
    assert_clean(update_once(state, timeout=60)["reports"]["f"])


@pytest.mark.timeout(300)
def test_a_stalled_freeze_lengthens_the_blackout_and_dma_goes_on(vm_host):
    """The freeze of the VM's two memfds (RAM, machine state) stalls 0.2 s
    each: the update still goes through, the stall is inside the blackout,
    and the device keeps completing the guest's work meanwhile."""
    state, conn = vm_host
    start_vm(state, conn)
    inject(conn, "freeze:memfd-v1@f=stall:0.2")
    report = update_once(state, timeout=60)["reports"]["f"]
    assert_clean(report)
    assert report["blackout_s"] >= 0.4 and report["phases_s"]["freeze"] >= 0.4
    assert report["dma_completed_during_blackout"] > 0


# --- kexec --------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_the_agent_killed_at_the_reboot_leaves_the_vm_running(vm_host):
    """The agent dies as it calls reboot: no kexec happens, the VMM sees its
    agent go with the VM prepared and resumes it (rollback), init starts
    the agent again, the VMM registers with it, and the next update works."""
    state, conn = vm_host
    st = start_vm(state, conn)
    agent_pid = next(u["pid"] for u in conn.call({"op": "units"})[0] if u["name"] == "agent")
    inject(conn, "kexec=kill:agent")
    with pytest.raises(AgentError, match="the agent died during the update"):
        update_once(state, timeout=30)
    status = host_status(conn)
    assert status["kexec_count"] == 0 and status["kexec_refused"] == 1
    unit_table = {u["name"]: u for u in status["units"]}
    assert unit_table["agent"]["restarts"] == 1 and unit_table["agent"]["pid"] != agent_pid
    assert_intact(state, "f", st)
    wait_until(lambda: UpdateStats.load(str(state.vm_dir("f") / "metrics.json")).updates["rolled_back"] == 1,
               "the rollback to be counted")
    inject(conn, clear=True)
    assert_clean(update_once(state, timeout=60)["reports"]["f"])


@pytest.mark.timeout(300)
def test_bus_master_cleared_by_the_new_kernel_is_set_again(kvm_ok, vm_host):
    """A new kernel that clears Bus Master Enable of a preserved device stops
    its DMA: the restored VMM sees it, puts the guest's configuration back,
    and the work in flight completes -- nothing lost."""
    state, conn = vm_host
    start_vm(state, conn, guest="firmware")
    inject(conn, "kexec=clear-bus-master")
    report = update_once(state, timeout=60)["reports"]["f"]
    assert report["bus_master_restored"] is True
    assert_clean(report)
    log = (state.logs / "vm-f.log").read_text()
    assert "Bus Master Enable clear: set again" in log


# --- after the kexec ------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_the_vmm_killed_while_restoring_is_restarted_on_its_session(kvm_ok, vm_host):
    """The restored VMM dies as it retrieves the device: init starts it again,
    and the new VMM restores the VM from the same incoming session (what the
    dead one retrieved is handed out again) -- nothing lost."""
    state, conn = vm_host
    start_vm(state, conn, guest="firmware")
    inject(conn, "retrieve:vfio-pci-v1@f=kill:vm-f")
    record = update_once(state, timeout=60)
    report = record["reports"]["f"]
    assert_clean(report)
    unit_table = {u["name"]: u for u in conn.call({"op": "units"})[0]}
    assert unit_table["vm-f"]["restarts"] == 1
    assert manage.status(state, "f")["boot"] == "restart"
    log = (state.logs / "vm-f.log").read_text()
    with open(state.log) as f:
        assert "injected fault at retrieve of vfio-pci-v1 in session 'f': killing unit vm-f" in f.read()
    assert "start (restart" in log


@pytest.mark.timeout(300)
def test_the_vmm_and_the_agent_killed_together_while_restoring_lose_nothing(kvm_ok, vm_host):
    """Both die as the VMM retrieves its device: the session they held would
    be released -- finished, its RAM and device let go -- and the VM booted
    cold, but init keeps it (the VMM left it in its fd store on retrieving
    it): the VMM init starts next restores the VM from it."""
    state, conn = vm_host
    start_vm(state, conn, guest="firmware")
    inject(conn, "retrieve:vfio-pci-v1@f=kill:vm-f,retrieve:vfio-pci-v1@f=kill:agent")
    record = update_once(state, timeout=60)
    assert record["phase"] == "done"
    assert_clean(record["reports"]["f"])
    unit_table = {u["name"]: u for u in conn.call({"op": "units"})[0]}
    assert unit_table["vm-f"]["restarts"] == 1 and unit_table["agent"]["restarts"] == 1
    assert manage.status(state, "f")["boot"] == "restart"  # restored, not booted cold
    inject(conn, clear=True)
    assert_clean(update_once(state, timeout=60)["reports"]["f"])
    # Finished: init keeps no session for it any more.
    wait_until(lambda: "incoming" not in next(u for u in conn.call({"op": "units"})[0]
                                              if u["name"] == "vm-f")["fdstore"], "the session to leave the store")


@pytest.mark.timeout(300)
def test_the_agent_killed_while_the_vms_restore_loses_nothing(kvm_ok, vm_host):
    """The agent of the new kernel dies as the VMM retrieves its device: the VMM
    goes on with the session it already holds, tells the agent that init
    starts next that its guest runs, leaves its files and its report there;
    the update completes with nothing lost."""
    state, conn = vm_host
    start_vm(state, conn, guest="firmware")
    inject(conn, "retrieve:vfio-pci-v1@f=kill:agent")
    record = update_once(state, timeout=60)
    assert record["phase"] == "done"
    assert_clean(record["reports"]["f"])
    unit_table = {u["name"]: u for u in conn.call({"op": "units"})[0]}
    assert unit_table["agent"]["restarts"] == 1 and unit_table["vm-f"]["restarts"] == 0
    inject(conn, clear=True)
    assert_clean(update_once(state, timeout=60)["reports"]["f"])


@pytest.mark.timeout(300)
def test_a_failing_retrieve_is_reported_and_the_session_kept(vm_host):
    """RETRIEVE_FD of the machine state fails, and LUO keeps that error for the
    file: the VM cannot be restored.  The VMM says so to the agent (the update
    fails with the reason), exits without being restarted in a loop, and does
    not boot a fresh VM over the old one: the session stays in LUO, its RAM
    and device held, for a look at what went wrong."""
    state, conn = vm_host
    start_vm(state, conn)
    inject(conn, "retrieve:memfd-v1@f=fail")
    with pytest.raises(AgentError, match="cannot restore the VM from its session"):
        update_once(state, timeout=60)
    unit = wait_until(lambda: next((u for u in conn.call({"op": "units"})[0]
                                    if u["name"] == "vm-f" and u["returncode"] is not None), None),
                      "the VMM to exit")
    assert unit["returncode"] == 78 and unit["restarts"] == 0  # EX_CONFIG: init does not retry it
    sessions = host_status(conn)["kernel"]["sessions"]
    assert [s["name"] for s in sessions if s["direction"] == "incoming"] == ["f"]


@pytest.mark.timeout(300)
def test_a_failing_finish_keeps_the_session_until_it_succeeds(vm_host):
    """FINISH fails: the VM runs on, the update is reported with the error,
    the incoming session stays in LUO, and the VMM finishes it once the
    kernel lets it."""
    state, conn = vm_host
    start_vm(state, conn)
    inject(conn, "finish@f=fail")
    report = update_once(state, timeout=60)["reports"]["f"]
    assert_clean(report)
    assert "FINISH failed" in report["finish_error"]
    sessions = host_status(conn)["kernel"]["sessions"]
    assert any(s["name"] == "f" and s["direction"] == "incoming" for s in sessions)
    assert "FINISH failed" in manage.status(state, "f")["finish_error"]
    inject(conn, clear=True)
    # Finished: luo_file_finish empties its file set (the session itself stays,
    # retrieved, until its fd is closed: luo_session_release).
    wait_until(lambda: not any(s["direction"] == "incoming" and s["files"]
                               for s in host_status(conn)["kernel"]["sessions"]),
               "the incoming session to be finished")
    # The VMM learns of its FINISH's success once the call returns to it.
    wait_until(lambda: manage.status(state, "f")["finish_error"] is None, "the VMM to see its FINISH succeed")
    assert_clean(update_once(state, timeout=60)["reports"]["f"])


@pytest.mark.timeout(300)
def test_the_vmm_killed_after_the_restore_is_restarted_on_its_files(kvm_ok, vm_host):
    """The restored VMM dies at FINISH, its guest already running: init starts
    it again on the files it left with the agent at once after the resume,
    the firmware recovers on the same RAM and device, and the update is
    reported as failed (its measurements died with that VMM) -- the VM is
    whole, and the next update works."""
    state, conn = vm_host
    start_vm(state, conn, guest="firmware")
    inject(conn, "finish@f=kill:vm-f")
    with pytest.raises(AgentError, match="its VMM died after the restore; restarted on its files"):
        update_once(state, timeout=60)
    inject(conn, clear=True)
    st = manage.wait_ready(state, "f")
    assert st["boot"] == "restart" and st["crash"] is None
    after = wait_for_progress(state, "f", st["mailbox"])
    assert after["recoveries"] == 1 and after["errors"] == 0 and after["verify_failures"] == 0
    assert after["submitted"] - after["completed"] == after["inflight"]  # no batch lost
    assert_clean(update_once(state, timeout=60)["reports"]["f"])


def test_a_machine_state_resumed_from_is_not_resumed_again():
    """Resuming twice from one saved state would take the guest back in time."""
    from luvmm.vmm import machine_state

    fd = os.memfd_create("state")
    os.ftruncate(fd, machine_state.STATE_MEMFD_SIZE)
    from tests.support.machine_state import sample_state as _state

    machine_state.write(fd, _state())
    assert machine_state.read(fd).vcpus[0].id == 0
    machine_state.mark_resumed(fd)
    with pytest.raises(machine_state.StateError, match="back in time"):
        machine_state.read(fd)
    os.close(fd)
