"""The VMM's control plane runs beside the VM, in a process of its own
(luvmm.vmm.link, luvmm.vmm.control): the VMM process that holds the guest loads
nothing after the resume -- no trio, no extension module -- and a control
plane that dies is started again with the guest running on."""

import importlib.util
import os
import signal
import urllib.request

import pytest

from luvmm.liveupdate.update import update_once
from tests.support.helpers import units
from tests.support.vms import wait_for_progress, wait_until
from luvmm.vmm import manage
from luvmm.vmm.config import VmConfig


def _extension(module: str) -> bool:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return False
    return bool(spec and spec.origin and spec.origin.endswith(".so"))


@pytest.mark.timeout(300)
def test_the_vmm_loads_nothing_after_the_resume(vm_host, kvm_ok, tmp_path):
    """Through an update, a status and a metrics scrape, the restored VMM
    imports no trio and loads no extension module beyond those its restore
    path loaded: each would interrupt the guest's CPUs (a TLB shootdown per
    page it maps and relocates)."""
    state, host = vm_host
    record = tmp_path / "imports"
    record.mkdir()
    manage.start(state, VmConfig("lean", memory=64 << 20, metrics="127.0.0.1:0"), units(host),
                 env={"LUVMM_RECORD_IMPORTS": str(record)})
    report = update_once(state, timeout=60)["reports"]["lean"]
    assert report["guest_progressed"] and report["crash"] is None
    st = wait_until(lambda: (lambda s: s["ready"] and s)(manage.status(state, "lean")), "the control plane up")
    assert st["pid"] != st["control_pid"]  # the control plane is another process
    with urllib.request.urlopen(f"http://127.0.0.1:{st['metrics_port']}/metrics", timeout=10) as r:
        assert b"luvmm_guest_heartbeats_total" in r.read()
    manage.stop(state, "lean", units(host))
    resumed = {f.name.split(".")[1]: set(f.read_text().split()) for f in record.glob("vmm-resumed.*")}
    stopped = {f.name.split(".")[1]: set(f.read_text().split()) for f in record.glob("vmm-stopped.*")}
    pid = str(st["pid"])
    assert pid in resumed and pid in stopped, (resumed.keys(), stopped.keys())
    later = stopped[pid] - resumed[pid]
    assert not {m for m in later if m == "trio" or m.startswith("trio.")}, "the VMM imported trio"
    assert not sorted(m for m in later if _extension(m)), "the VMM loaded extension modules after the resume"


@pytest.mark.timeout(300)
def test_a_control_plane_that_dies_is_started_again_with_the_guest_running_on(vm_host, kvm_ok):
    state, host = vm_host
    manage.start(state, VmConfig("cp", memory=64 << 20), units(host))
    st = manage.status(state, "cp")
    assert st["control_pid"] != st["pid"]
    os.kill(st["control_pid"], signal.SIGKILL)

    def again():
        try:
            now = manage.status(state, "cp")
        except OSError:
            return None  # between the two control planes
        return now if now["control_pid"] != st["control_pid"] and now["ready"] else None

    now = wait_until(again, "a new control plane")
    assert now["pid"] == st["pid"] and now["crash"] is None  # the same VMM: the guest never stopped
    wait_for_progress(state, "cp", st["mailbox"])
    report = update_once(state, timeout=60)["reports"]["cp"]  # and the VM still updates
    assert report["guest_progressed"] and (report["dma_errors"], report["dma_lost"]) == (0, 0)
