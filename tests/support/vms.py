"""Helpers of the VM tests: faults, VMs started and checked, waiting on other processes."""

import time

from tests.support.helpers import units
from luvmm.vmm import manage
from luvmm.vmm.config import VmConfig


def inject(conn, spec: str | None = None, *, clear: bool = False) -> list[str]:
    request = {"op": "faults", "clear": clear}
    if spec:
        request["set"] = spec
    return conn.call(request)[0]


def start_vm(state, conn, name="f", guest="synthetic"):
    manage.start(state, VmConfig(name, memory=64 << 20, guest=guest), units(conn))
    return manage.status(state, name)


def assert_intact(state, name, st):
    """The same VMM runs the guest on, its counters going on, nothing lost."""
    after = wait_for_progress(state, name, manage.status(state, name)["mailbox"])
    now = manage.status(state, name)
    assert now["pid"] == st["pid"] and now["crash"] is None
    assert after["completed"] > st["mailbox"]["completed"]
    assert after["errors"] == 0 and after["verify_failures"] == 0


def assert_clean(report):
    assert report["guest_progressed"] and report["crash"] is None
    assert (report["dma_errors"], report["dma_lost"], report["dma_corrupted"]) == (0, 0, 0)


def host_status(conn):
    return conn.call({"op": "status"})[0]


def wait_until(predicate, what, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)  # another process does it
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_progress(state, name, before, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = manage.status(state, name)["mailbox"]
        if now["completed"] > before["completed"] and now["heartbeat"] > before["heartbeat"]:
            return now
        time.sleep(0.01)  # the guest runs in another process
    raise AssertionError("the guest did not make progress after the rollback")


def wait_for_restart(state, name, old_pid, timeout=60):
    """The status of the VMM that init started after ``old_pid`` died, once its guest runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            st = manage.status(state, name)
            if st["pid"] != old_pid and st["guest_state"] == "running":
                return st
        except (OSError, ValueError):
            pass  # between the two VMMs
        time.sleep(0.01)  # init restarts the VMM in another process
    raise AssertionError(f"the VMM of {name} was not restarted")
