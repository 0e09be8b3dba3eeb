"""A unit's file descriptor store (luvmm.liveupdate.fdstore, luvmm.liveupdate.init): kept
by init through the systemd protocol, so a VMM that dies is started again on
the very same files -- whatever happened to the LUO agent meanwhile."""

import json
import os
import sys
import time

SUPPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support")


HERE = os.path.dirname(os.path.abspath(__file__))


def run_until(predicate, what, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value is not None:
            return value
        time.sleep(0.02)  # another process does it
    raise AssertionError(f"timed out waiting for {what}")


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def start(state, conn, name, out, **unit):
    state.write_unit(name, [sys.executable, os.path.join(SUPPORT, "fdstore_unit.py")], {"FDSTORE_OUT": out,
                     **unit.pop("env", {})}, restart="on-failure", **unit)
    conn.call({"op": "unit-start", "name": name})


def test_a_unit_that_dies_is_started_again_on_the_files_it_stored(emulated_host):
    state, conn = emulated_host.state, emulated_host.host
    out = os.path.join(state.path, "out.json")
    start(state, conn, "vm-s", out, fdstore_max=4)
    got = run_until(lambda: _read(out), "the restarted process's report")
    assert got["ram"] == "what the dead process wrote" and got["names"] == ["ram"]
    assert got["meta"]["pid"] != got["pid"]  # stored by the dead one
    assert got["fds"] == [3] and got["env"] == {"LISTEN_FDS": None, "LISTEN_PID": None}  # taken, env cleared
    unit = next(u for u in conn.call({"op": "units"})[0] if u["name"] == "vm-s")
    assert unit["restarts"] == 1 and unit["fdstore"] == ["meta", "ram"]
    conn.call({"op": "unit-stop", "name": "vm-s"})  # stopping flushes the store
    assert conn.call({"op": "units"})[0][0]["fdstore"] == []


def test_the_store_is_bounded_and_holds_nothing_without_a_limit(emulated_host):
    state, conn = emulated_host.state, emulated_host.host
    out = os.path.join(state.path, "out.json")
    start(state, conn, "vm-t", out, fdstore_max=2, env={"FDSTORE_EXTRA": "3"})
    got = run_until(lambda: _read(out), "the restarted process's report")
    assert got == {"stored": None}  # FileDescriptorStoreMax=2: "ram" and "extra0"; the rest, meta too, refused
    unit = next(u for u in conn.call({"op": "units"})[0] if u["name"] == "vm-t")
    assert unit["fdstore"] == ["extra0", "ram"]
    conn.call({"op": "unit-stop", "name": "vm-t"})
    os.unlink(out)
    start(state, conn, "vm-u", out)  # no fdstore_max: no $NOTIFY_SOCKET, so nothing to keep
    assert run_until(lambda: _read(out), "the restarted process's report") == {"stored": None}
    assert next(u for u in conn.call({"op": "units"})[0] if u["name"] == "vm-u")["fdstore"] == []
