"""Runs inside the lab guest, in two stages around a real kexec: a VM of
luvmm's own VMM classes (vmm.vm.Vm, synthetic guest) with the lab's edu
passed through, kept across the kexec by a mainline kernel, which preserves
its memfds but not its device.

Stage 1 boots the VM on the edu function, lets its driver move patterns,
preserves it into a LUO session (RAM and state memfds preserved; the device
and iommufd refused by the kernel, recorded), prepares (pause + machine
state), and kexecs from this process, which holds the session.  Stage 2
retrieves the session, restores the VM (RAM mapped, device opened again by
its BDF, re-mapped, re-attached, the driver told it was reset), lets it
run, and records the counters and the report.  ``vm-restore-N.json``.

    python -m tests.lab.guest_vm_restore
"""

from __future__ import annotations

import os
import time
import traceback

from liveupdate.luo import LiveUpdate
from luvmm.host import RealHost
from luvmm.lab import guest
from luvmm.services import Services
from vmm.config import VmConfig
from vmm.vm import Clock, Vm

NAME = "lab-edu"


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)  # polling counters the VM's own thread moves
    return False


def stage1() -> None:
    host = RealHost()
    bdf = guest.devices()[0]
    vm = Vm(host, VmConfig(NAME, memory=32 << 20, device=bdf, guest="synthetic"))
    vm.cold_boot()
    ran = wait_for(lambda: vm.mailbox["completed"] >= 3, 60)
    luo = LiveUpdate.open(host)
    session = luo.create_session(NAME)
    vm.preserve(session)
    before = vm.mailbox.snapshot()
    marks = vm.prepare(session)
    guest.save("vm-restore-1.json", {"ran": ran, "kind": vm.device.kind, "preserved": sorted(vm.preserved),
                                     "unpreservable": vm.unpreservable, "mailbox_before_prepare": before,
                                     "mailbox_at_pause": vm.mailbox.snapshot(), "in_flight": vm.in_flight(),
                                     "marks": marks})
    guest.kexec()  # holds `luo` and `session` open: LUO hands them to the next kernel


def stage2() -> None:
    host = RealHost()
    session = LiveUpdate.open(host).retrieve_session(NAME)
    clock = Clock()
    vm, saved = Vm.restore(host, session, clock)
    at_resume = vm.mailbox.snapshot()
    start = at_resume["completed"]
    went_on = wait_for(lambda: vm.mailbox["completed"] >= start + 3, 60)
    clock.mark("verified")
    from vmm.report import update_report

    report = update_report(vm, Services(), clock.marks, saved, vm.mailbox.snapshot())
    session.finish()
    vm.stop()
    guest.save("vm-restore-2.json", {"went_on": went_on, "kind": vm.device.kind, "was_reset": vm.device.was_reset,
                                     "device_preserved": saved.device.preserved, "mailbox_at_resume": at_resume,
                                     "mailbox_after": vm.mailbox.snapshot(), "report": report})


def main() -> int:
    n = guest.stage()
    try:
        stage1() if n == 1 else stage2()
    except Exception:
        guest.save(f"vm-restore-{n}-error.json", {"traceback": traceback.format_exc()})
        return 1
    return 0


if __name__ == "__main__":
    os._exit(main())
