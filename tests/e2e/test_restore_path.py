"""The restore path's imports, pinned: the modules a restored VMM has
imported when its guest runs again, and those the agent has imported when
it has served the restoring VMMs (before trio).  Each module is blackout --
`import json` alone is ~15 ms here -- so a new one fails this test with its
name and what it costs; a module gone is a win to pin (the message says how:
LUVMM_PIN_RESTORE_PATH=1)."""

import os
import subprocess
import sys
import tempfile

import pytest

from luvmm.liveupdate.update import update_once
from tests.support.helpers import units
from luvmm.vmm import manage
from luvmm.vmm.config import VmConfig

HERE = os.path.dirname(os.path.abspath(__file__))
PINS = os.path.join(HERE, "restore_path")


def import_cost_ms(module: str) -> float:
    """What importing ``module`` costs a fresh interpreter started as units are (-S), in ms."""
    proc = subprocess.run([sys.executable, "-S", "-X", "importtime", "-c",
                           f"import sys; sys.path += {sys.path!r}; import {module}"],
                          capture_output=True, text=True, timeout=60)
    for line in proc.stderr.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2] == module and parts[1].isdigit():
            return int(parts[1]) / 1000
    return float("nan")


@pytest.fixture(params=["firmware", "synthetic"])
def recorded(request, tmp_path):
    guest = request.param
    if guest == "firmware":
        request.getfixturevalue("kvm_ok")
    from luvmm.liveupdate.emu import hostctl
    from luvmm.liveupdate.emu.client import connect
    from luvmm.liveupdate.state import StateDir

    record = tmp_path / "imports"
    record.mkdir()
    state = StateDir(tempfile.mkdtemp(prefix="luvmm-rp-"))
    hostctl.start(state, env={"LUVMM_RECORD_IMPORTS": str(record)}, dsa_bandwidth=48 << 20)
    host = connect(state.socket)
    try:
        manage.start(state, VmConfig("rp", memory=64 << 20, guest=guest), units(host))
        update_once(state, timeout=60)  # warm: bytecode cached, as after every first update
        for f in record.iterdir():
            f.unlink()
        update_once(state, timeout=60)
        yield guest, {f.name.split(".")[0]: set(f.read_text().split()) for f in record.iterdir()}
    finally:
        host.close_connection()
        hostctl.stop(state)
        import shutil

        shutil.rmtree(state.path, ignore_errors=True)


def check(point: str, got: set[str]) -> None:
    path = os.path.join(PINS, f"{point}.txt")
    if os.environ.get("LUVMM_PIN_RESTORE_PATH"):
        with open(path, "w") as f:
            f.write("".join(f"{m}\n" for m in sorted(got)))
    pinned = set(open(path).read().split())
    new, gone = sorted(got - pinned), sorted(pinned - got)
    costs = ", ".join(f"{m} ({import_cost_ms(m):.1f} ms)" for m in new)
    assert not new, f"{point}: new imports on the restore path: {costs}"
    assert not gone, (f"{point}: no longer imported: {', '.join(gone)} -- pin the smaller set "
                      f"(LUVMM_PIN_RESTORE_PATH=1 python -m pytest tests/e2e/test_restore_path.py)")


def test_a_restored_vmm_imports_only_the_pinned_modules_before_its_guest_runs(recorded):
    guest, found = recorded
    assert "vmm-resumed" in found, found.keys()
    check(f"vmm-{guest}", found["vmm-resumed"])


def test_the_agent_imports_only_the_pinned_modules_while_it_serves_the_restore(recorded):
    _, found = recorded  # the same set whatever the guest: one pin for both
    assert "agent-served-restore" in found, found.keys()
    check("agent", found["agent-served-restore"])
