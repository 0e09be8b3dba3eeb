"""`luvmm boot` as an rc script runs it, on this machine's real kernel: the
init's mechanics -- its units, their environment, its socket, one init per
state dir, stopping without leftovers.  Here the agent unit fails (there is
no /dev/liveupdate) and is restarted with a growing delay, as it would be on
a host without LUO; a VM-like unit (tests/support/boot_unit.py) says what
init gave it."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

from luvmm.liveupdate.state import StateDir
from tests.support.cli import LUVMM

UNIT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support", "boot_unit.py")


def wait_for(what: str, condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)  # polling a condition, with a deadline


def read_report(path: str, unlike_pid: int | None = None):
    try:
        with open(path) as f:
            found = json.load(f)
    except FileNotFoundError:
        return None
    return None if found["pid"] == unlike_pid else found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def vm_like_unit(state: StateDir, report: str) -> None:
    state.write_unit("vm-t", [sys.executable, UNIT, report], restart="on-failure")


def init_files(state: StateDir) -> list[str]:
    return [name for name in ("init.sock", "notify.sock", "boot.pid", "agent.sock")
            if os.path.lexists(os.path.join(state.runtime, name))]


def test_boot_starts_the_units_answers_on_its_socket_and_stops_without_leftovers(cli):
    from luvmm.services import InitUnits
    from luvmm.wiring import real_units

    state = StateDir(cli.state, cli.runtime)
    report = os.path.join(cli.root, "report.json")
    vm_like_unit(state, report)
    cli.keep(state.path)  # the state dir stays (a host's units and logs), as on a real host
    cli.keep(report)

    out = cli("boot", "--host", "real", "--state-dir", state.path).stdout
    assert "kexec boot" in out and "agent, vm-t" in out, out
    pid = int(out.split("(pid ", 1)[1].split(",")[0])
    assert alive(pid) and open(os.path.join(state.runtime, "boot.pid")).read().strip() == str(pid)
    assert os.stat(state.init_socket).st_mode & 0o777 == 0o600
    agent = json.loads((state.units / "agent.json").read_text())
    assert agent["argv"][-1].endswith("['--state-dir', %r, '--host', 'real']))" % state.path), agent["argv"]

    found = wait_for("report from the unit", lambda: read_report(report))
    env = found["env"]
    assert env["LUVMM_BOOT"] == "kexec"  # the first init since the kernel booted
    assert env["LUVMM_INIT_SOCKET"] == state.init_socket and env["LUVMM_STATE_DIR"] == state.path
    assert env["LUVMM_UNIT"] == "vm-t" and env["LUVMM_INIT_PID"] == str(pid)
    assert "LUVMM_HOST_SOCKET" not in env and "NOTIFY_SOCKET" not in env
    # What init answers a unit: its units, but no operator's request nor the agent's.
    assert found["units"] == ["agent", "vm-t"]
    assert found["start_errno"] == errno.EPERM and found["unit_of_errno"] == errno.EPERM

    # The operator's: which unit a process is, and every unit, over init.sock.
    units = real_units(state)
    assert isinstance(units, InitUnits)
    table = {u["name"]: u for u in units.list()}
    assert table["vm-t"]["running"] and table["vm-t"]["pid"] == found["pid"]
    assert units.unit_of(found["pid"]) == "vm-t" and units.unit_of(os.getpid()) is None

    # A unit that dies is started again, told so.
    os.kill(found["pid"], signal.SIGKILL)
    again = wait_for("the restarted unit's report", lambda: read_report(report, unlike_pid=found["pid"]))
    assert again["env"]["LUVMM_BOOT"] == "restart"

    second = cli("boot", "--host", "real", "--state-dir", state.path, status=1)
    assert "already runs" in cli.error_line(second) and str(pid) in second.stderr

    stopped = cli("boot", "--stop", "--state-dir", state.path)
    assert "stopped" in stopped.stdout
    assert not alive(pid) and not alive(again["pid"])
    assert init_files(state) == []

    # Again in the same boot: cold (what the kexec handed over was the first init's).
    os.unlink(report)
    out = cli("boot", "--state-dir", state.path).stdout
    assert "cold boot" in out, out
    cold = wait_for("report from the unit", lambda: read_report(report))
    assert cold["env"]["LUVMM_BOOT"] == "cold"
    assert units.unit_of(cold["pid"]) == "vm-t"  # the client of the init that went connects to the new one
    units.client.close()
    cli("boot", "--stop", "--state-dir", state.path)
    assert init_files(state) == []
    assert cli("boot", "--stop", "--state-dir", state.path).stderr.startswith("luvmm boot: no luvmm init is running")


def test_boot_in_the_foreground_stops_on_sigterm_and_a_unit_that_cannot_start_stops_no_other(cli):
    state = StateDir(cli.state, cli.runtime)
    report = os.path.join(cli.root, "report.json")
    vm_like_unit(state, report)
    state.write_unit("vm-gone", [os.path.join(cli.root, "no-such-program")], pdeathsig="self")
    cli.keep(state.path)
    cli.keep(report)
    proc = subprocess.Popen(LUVMM + ["boot", "--foreground", "--state-dir", state.path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli.env, cwd=cli.root)
    try:
        line = proc.stdout.readline()  # the one line, once it serves
        assert f"(pid {proc.pid}, kexec boot): started agent, vm-t;" in line, line or proc.stderr.read()
        found = wait_for("report from the unit", lambda: read_report(report))
        assert found["env"]["LUVMM_INIT_PID"] == str(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "unit vm-gone cannot start" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert not alive(found["pid"])
    assert init_files(state) == []


def test_boot_refusals_are_one_line_and_leave_nothing(cli, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    line = cli.error_line(cli("boot", "--state-dir", str(not_a_dir), status=1))
    assert line.startswith("luvmm boot: ") and "not a directory" in line
    assert not_a_dir.read_text() == ""

    line = cli.error_line(cli("boot", "--host", "emulated", status=2))
    assert line.startswith("luvmm boot: --host emulated")

    missing = tmp_path / "none" / "state"
    line = cli.error_line(cli("boot", "--state-dir", str(missing), status=1))
    assert "cannot use" in line and not missing.parent.exists()
    assert not os.path.exists(cli.state)  # nothing started, nothing made where it was not asked


def test_boot_help_says_what_it_does(cli):
    out = cli("boot", "--help").stdout
    for what in ("init.sock", "boot.log", "/var/lib/luvmm", "--foreground", "--stop", "after a kexec", "cold"):
        assert what in out, what
