"""Isolation: a VMM acts on its own VM only.  It cannot retrieve, finish or
take the files of another VM's session (the agent refuses a VM's requests to
any unit but that VM's), ask what is the operator's (updates, init, faults,
the machine's stop) -- not even through a socket a dead child left it, nor
from a process that left its unit --, plant files in another unit's fd
store, open a device bound elsewhere, or reach another VM's memory through
the IOMMU; and only the owner can reach the host at all."""

import errno
import json
import os
import stat
import sys
import time

import pytest

from luvmm.liveupdate.agent_client import wait_for_agent
from luvmm.liveupdate.update import update_once
from luvmm.vmm import manage
from luvmm.vmm.config import VmConfig
from tests.support.helpers import units

SUPPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support")

HERE = os.path.dirname(os.path.abspath(__file__))


def run_unit(state, conn, name, argv, env, timeout=60):
    """Start a unit and wait for its process to exit; returns its status."""
    state.write_unit(name, argv, env)
    conn.call({"op": "unit-start", "name": name})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        unit = next(u for u in conn.call({"op": "units"})[0] if u["name"] == name)
        if unit["returncode"] is not None:
            state.remove_unit(name)  # not a VM the next update should wait for
            return unit
        time.sleep(0.02)  # the unit is another process
    raise AssertionError(f"unit {name} did not finish")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("vm_host", [{"devices": 2}], indirect=True)
def test_a_vmm_cannot_reach_another_vms_session_files_device_or_memory(vm_host):
    state, conn = vm_host
    manage.start(state, VmConfig("a", memory=64 << 20, guest="synthetic"), units(conn))
    a = manage.status(state, "a")
    fdstore_before = next(u for u in conn.call({"op": "units"})[0] if u["name"] == "vm-a")["fdstore"]
    assert fdstore_before == ["device", "iommufd", "meta", "ram", "state"]
    out = os.path.join(state.path, "evil.json")
    unit = run_unit(state, conn, "vm-evil", [sys.executable, os.path.join(SUPPORT, "evil_vmm.py"), "a", a["bdf"],
                                             str(a["config"].get("ioas", 1))], {"EVIL_OUT": out})
    assert unit["returncode"] == 0, (state.logs / "vm-evil.log").read_text()
    with open(out) as f:
        got = json.load(f)
    refused = ["retrieve-session", "create-session", "register", "resumed", "restored", "agent update",
               "agent status", "agent abandon", "agent result", "agent release", "host unit-stop", "host unit-start",
               "host faults", "host kexec", "host stop", "dead child's socket", "double-forked grandchild"]
    assert {op: got[op] for op in refused} == {op: errno.EPERM for op in refused}
    assert got["fdstore"] == "ok"  # sent; but it went to its own unit's store, which holds nothing
    unit_table = {u["name"]: u for u in conn.call({"op": "units"})[0]}
    assert unit_table["vm-a"]["fdstore"] == fdstore_before and unit_table["vm-a"]["running"]
    assert conn.call({"op": "faults"})[0] == []
    # VM a's device: bound through VM a's fd, so this one can do nothing with it.
    assert got["bind device"] == errno.EINVAL
    assert got["reset device"] == errno.EINVAL and got["read device BAR0"] == errno.EINVAL
    assert got["open /dev/liveupdate"] == errno.EBUSY  # the agent holds it
    assert got["destroy victim ioas"] == errno.ENOENT  # object ids are per iommufd
    assert got["map victim ioas"] == errno.ENOENT
    # Accepted as the kernel does (iommufd_ioas_map pins nothing yet); the emulated kernel can never
    # pin another process's VA (EREMOTE at the first pin), so no device ever reaches it.
    assert got["map a user VA"] == "ok"
    # VM a did not notice: its session, files and update are whole.
    report = update_once(state, timeout=60)["reports"]["a"]
    assert report["guest_progressed"] and (report["dma_errors"], report["dma_lost"], report["dma_corrupted"]) == (0, 0, 0)


def test_only_the_owner_reaches_the_host(vm_host):
    state, conn = vm_host
    wait_for_agent(state, 30)[0].close()
    for path in (state.socket, state.agent_socket):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert stat.S_IMODE(os.stat(state.path).st_mode) & 0o077 == 0
