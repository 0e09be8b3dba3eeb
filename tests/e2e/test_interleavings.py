"""Commands that meet an update (issue 24, items 4 and 8): `vm stop` and
`vm start` while one is in progress are refused in one line, and nothing a
VM held -- its device, its LUO sessions, its RAM -- outlives it.  Real
processes, the real CLI; the ``cli`` fixture checks nothing is left."""

import json
import os
import subprocess
import time

from luvmm import exitcodes
from tests.support.cli import LUVMM


def host_status(cli) -> dict:
    return json.loads(cli("host", "status", "--json").stdout)


def held_by_the_kernel(cli) -> dict:
    """What the emulated kernel still holds for VMs: sessions, devices in use, RAM memfds."""
    kernel = host_status(cli)["kernel"]
    return {"sessions": [s["name"] for s in kernel["sessions"]],
            "devices": [d["bdf"] for d in kernel["vfio"] if d.get("bound") or d.get("bus_master")],
            "memfds": [f for f in kernel["open_files"] if "memfd" in f]}


NOTHING = {"sessions": [], "devices": [], "memfds": []}


def wait_for_update_in_progress(cli, timeout: float = 60.0) -> dict:
    """The agent's record of an update whose VMs are restoring (the new
    kernel's agent writes it when it starts; see liveupdate.agent)."""
    record = os.path.join(cli.state, "agent", "update.json")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(record) as f:
                update = json.load(f)
            if update.get("phase") == "restoring":
                return update
        except (OSError, ValueError):
            pass  # not written yet, or being replaced
        time.sleep(0.01)  # the agent is another process: poll what it writes
    raise AssertionError(f"no update in progress in {timeout:.0f} s")


def test_vm_stop_and_start_during_an_update_are_refused_and_the_device_is_not_leaked(cli):
    cli("vm", "start", "d2", "--guest", "synthetic", "--memory", "64M")
    cli("host", "faults", "finish=stall:2")  # each update restores for two seconds at least (its guest runs)
    update = subprocess.Popen(LUVMM + ["update", "--cycles", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=cli.env, cwd=cli.root)
    try:
        in_progress = wait_for_update_in_progress(cli)
        stop = cli("vm", "stop", "d2", status=exitcodes.FAILED)
        assert cli.error_line(stop).startswith("luvmm vm stop: an update is in progress on this host (update "), \
            stop.stderr
        start = cli("vm", "start", "d3", "--guest", "synthetic", "--memory", "64M", status=exitcodes.FAILED)
        assert "an update is in progress on this host" in cli.error_line(start), start.stderr
        out, err = update.communicate(timeout=120)
    finally:
        update.kill()
    # Neither touched the update: both cycles ran, on d2, and say so.
    assert update.returncode == exitcodes.OK, (out, err)
    last = json.loads(cli("update", "--last", "--json").stdout)
    assert [c["vm"] for c in last["cycles"]] == ["d2"] and last["updates"][0]["id"] != in_progress["id"]
    assert [(r["name"], r["state"]) for r in json.loads(cli("vm", "list", "--json").stdout)] == [("d2", "running")]
    cli("host", "faults", "--clear")
    cli("vm", "stop", "d2")
    assert held_by_the_kernel(cli) == NOTHING
    cli("vm", "start", "d2", "--guest", "synthetic", "--memory", "64M")  # its device is free again
    cli("vm", "stop", "d2")
    cli("host", "stop")


def machine_memory(cli) -> list[int]:
    """The sizes of the memory the emulated machine keeps (mapped for DMA, or held for a handover)."""
    machine = host_status(cli)["machine"]
    return sorted(m["bytes"] for m in machine["memory"]) + [-1] * len(machine["held_memory"])


def test_a_vm_that_does_not_start_leaves_no_memory_behind_nor_does_a_stopped_one(cli):
    """Issue 24, item 8: a failed `vm start --memory 1G` (the host's one DSA
    is taken) left its RAM memfd with the machine until the next kexec; so
    did every stopped VM whose RAM had been handed over by an update."""
    cli("vm", "start", "a", "--guest", "synthetic", "--memory", "64M")
    before = machine_memory(cli)
    assert before and set(before) <= {64 << 20, -1}
    proc = cli("vm", "start", "b", "--guest", "synthetic", "--memory", "1G", status=exitcodes.FAILED)
    assert "every DSA of the host is passed through" in proc.stderr
    assert machine_memory(cli) == before  # nothing of b's 1 GiB
    cli("update")
    cli("vm", "stop", "a")
    assert machine_memory(cli) == [] and held_by_the_kernel(cli) == NOTHING
    cli("host", "stop")
