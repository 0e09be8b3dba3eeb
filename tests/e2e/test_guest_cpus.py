"""CPUs set apart for the guests (`--guest-cpus`): the vCPUs run there, and
what else luvmm runs keeps off them once the guests run -- the emulated
host's DSA engine and kernel, the agent, the VMM's control plane -- before
and after a live update (during one, the guests' CPUs are the restore's).
Read from the kernel: each thread's Cpus_allowed_list."""

import os

import pytest

from luvmm.liveupdate.state import parse_cpu_list
from luvmm.liveupdate.update import update_once
from tests.support.helpers import units
from luvmm.vmm import manage
from luvmm.vmm.config import VmConfig


def test_cpu_lists_read_as_the_kernel_writes_them():
    assert parse_cpu_list("0,2-3") == {0, 2, 3} and parse_cpu_list("5") == {5}
    for bad in ("", "x", "3-1", "1,", "-1", "1-2-3"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


def threads(pid: int) -> dict[int, tuple[str, frozenset]]:
    """{tid: (name, the CPUs it may run on)}."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        except FileNotFoundError:
            continue
        out[int(tid)] = (fields["Name"], parse_cpu_list(fields["Cpus_allowed_list"]))
    return out


@pytest.fixture
def pinned_host(kvm_ok):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs: one for the guest, one for the rest")
    from luvmm.liveupdate.emu import hostctl
    from luvmm.liveupdate.emu.client import connect
    from luvmm.liveupdate.state import StateDir
    import shutil
    import tempfile

    guest = max(os.sched_getaffinity(0))
    state = StateDir(tempfile.mkdtemp(prefix="luvmm-gc-"))
    hostctl.start(state, dsa_bandwidth=48 << 20, guest_cpus=str(guest))
    host = connect(state.socket)
    try:
        yield state, host, guest
    finally:
        host.close_connection()
        hostctl.stop(state)
        shutil.rmtree(state.path, ignore_errors=True)


def check(state, guest: int) -> None:
    st = manage.wait_ready(state, "gc")
    vmm = threads(st["pid"])
    vcpus = [cpus for name, cpus in vmm.values() if name == "vcpu0"]
    assert vcpus == [{guest}], vmm  # the vCPU thread, named, on the guest CPU
    for tid, (name, cpus) in vmm.items():
        # Not KVM's own workers (kvm-nx-lpage-recovery: started from the vCPU's thread, for the guest).
        if name != "vcpu0" and not name.startswith("kvm-"):
            assert guest not in cpus, (tid, name, cpus)  # the control plane, and what it started
    for pid in (state.pid(), int(next(u["pid"] for u in units_of(state) if u["name"] == "agent"))):
        for tid, (name, cpus) in threads(pid).items():
            assert guest not in cpus, (pid, tid, name, cpus)


def units_of(state):
    from luvmm.liveupdate.emu.client import connect

    host = connect(state.socket)
    try:
        return host.call({"op": "units"})[0]
    finally:
        host.close_connection()


def test_the_guest_cpu_is_the_vcpus_and_luvmm_keeps_off_it(pinned_host):
    state, host, guest = pinned_host
    manage.start(state, VmConfig("gc", memory=64 << 20), units(host))
    check(state, guest)
    report = update_once(state, timeout=60)["reports"]["gc"]
    assert report.get("error") is None and report["guest_progressed"]
    check(state, guest)  # the restored VMM, the new agent, and the daemon back off it


def test_the_old_kernels_units_die_once_the_restored_guest_runs_not_in_its_blackout(pinned_host):
    """At the emulated kexec the old units are stopped (they run no more),
    and killed -- their teardown off the guest CPU, last in line for the
    others -- only once the restored VMM says its guest runs: a real kexec
    has no teardown, so none is in the blackout.  Gone when the update is done."""
    state, host, guest = pinned_host
    manage.start(state, VmConfig("gc", memory=64 << 20), units(host))
    old = manage.wait_ready(state, "gc")["pid"]
    report = update_once(state, timeout=60)["reports"]["gc"]
    assert report.get("error") is None and report["guest_progressed"]
    marks = report["marks"]
    assert marks["host_frozen"] <= marks["host_spawned"] <= marks["resumed"] <= marks["host_reaped"], marks
    assert not os.path.exists(f"/proc/{old}")
