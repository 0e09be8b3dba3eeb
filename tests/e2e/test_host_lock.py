"""One emulated host per state dir, whatever starts one at the same moment
(issue 24, item 1): `luvmm host start` twice at once, `luvmm vm start` twice
at once in an empty dir, a daemon started by hand beside a running host.
Real processes, the real CLI; the ``cli`` fixture checks nothing is left."""

import json
import os
import subprocess

from luvmm import exitcodes
from tests.support.cli import LUVMM


def daemons(state_dir: str) -> list[int]:
    """The emulated host daemons of ``state_dir`` that run (their command lines name it)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if b"luvmm.liveupdate.emu.daemon" in argv and state_dir.encode() in argv and not zombie:
            found.append(int(pid))
    return found


def at_once(cli, *commands) -> list[subprocess.CompletedProcess]:
    """Run ``luvmm`` commands at the same moment (each in its own process), to their ends."""
    procs = [subprocess.Popen(LUVMM + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=cli.env, cwd=cli.root) for args in commands]
    done = []
    for args, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return done


def test_two_host_starts_at_once_make_one_host_and_the_other_says_so(cli):
    for _ in range(3):  # several interleavings of the same race
        first, second = at_once(cli, ("host", "start", "--state-dir", cli.state),
                                ("host", "start", "--state-dir", cli.state))
        assert sorted([first.returncode, second.returncode]) == [exitcodes.OK, exitcodes.FAILED], (first, second)
        loser = first if first.returncode else second
        assert loser.stdout == "" and len(loser.stderr.strip().splitlines()) == 1, loser.stderr
        assert "already running" in loser.stderr
        running = daemons(cli.state)
        assert len(running) == 1, running
        status = cli("host", "status", "--json", "--state-dir", cli.state)
        assert f'"pid": {running[0]}' in status.stdout
        cli("host", "stop", "--state-dir", cli.state)
        assert daemons(cli.state) == []
        assert not os.path.exists(cli.state)  # luvmm made it, nothing is left: it went too


def test_a_losing_starter_removes_nothing_of_the_running_host(cli):
    """A second daemon, started by hand over a running host, exits at once
    and leaves the host's socket, pid file and lock as they were."""
    import sys

    cli("host", "start", "--state-dir", cli.state)

    def files():
        return {name: os.stat(os.path.join(cli.state, name)).st_ino for name in ("host.sock", "host.pid", "host.lock")}

    before = files()
    proc = subprocess.run([sys.executable, "-m", "luvmm.liveupdate.emu.daemon", "--state-dir", cli.state],
                          capture_output=True, text=True, env=cli.env, timeout=60)
    assert proc.returncode == 1 and "already running (or starting)" in proc.stderr, proc.stderr
    assert files() == before  # the same files, not made again
    assert len(daemons(cli.state)) == 1
    cli("host", "status", "--state-dir", cli.state)  # still answering
    cli("host", "stop", "--state-dir", cli.state)


def test_two_vm_starts_at_once_in_an_empty_dir_share_one_host(cli):
    """Each `vm start` starts the host if none runs; started at once, one
    starts it and the other waits for it and uses it."""
    a, b = at_once(cli, ("vm", "start", "a", "--guest", "synthetic", "--memory", "64M"),
                   ("vm", "start", "b", "--guest", "synthetic", "--memory", "64M"))
    said = [p.stderr.count("started an emulated host") for p in (a, b)]
    assert sorted(said) == [0, 1], (a, b)
    assert len(daemons(cli.state)) == 1
    started = [name for p, name in ((a, "a"), (b, "b")) if p.returncode == exitcodes.OK]
    assert started, (a, b)
    for p in (a, b):
        if p.returncode != exitcodes.OK:  # the host has one DSA: the second VM finds it taken, and says so
            errors = [line for line in p.stderr.splitlines() if "started an emulated host" not in line]
            assert len(errors) == 1 and "every DSA of the host is passed through" in errors[0], p.stderr
    assert sorted(row["name"] for row in json.loads(cli("vm", "list", "--json").stdout)) == started
    for name in started:
        cli("vm", "stop", name)
    cli("host", "stop")
    assert daemons(cli.state) == []


def test_two_updates_at_once_run_one_after_the_other_or_one_is_refused_in_one_line(cli):
    """A second `luvmm update` while one runs is refused up front while the
    first prepares and reboots, or waits for it in the next kernel (issue
    24, item 6) -- never cut off by the other's kexec ("the agent went away")."""
    import json

    cli("vm", "start", "a", "--guest", "synthetic", "--memory", "64M")
    cli("host", "faults", "freeze=stall:1")  # each update lasts a second at least: the two overlap
    for _ in range(3):
        first, second = at_once(cli, ("update",), ("update",))
        assert exitcodes.OK in (first.returncode, second.returncode), (first, second)
        for proc in (first, second):  # the other ran after it (the new kernel's agent waits), or was refused
            if proc.returncode != exitcodes.OK:
                assert proc.returncode == exitcodes.FAILED and proc.stdout == "", proc
                assert cli.error_line(proc).startswith(
                    "luvmm update: another live update is in progress on this host"), proc.stderr
        last = json.loads(cli("update", "--last", "--json").stdout)
        assert last["cycles"][0]["vm"] == "a" and not last["cycles"][0].get("error")
    cli("host", "faults", "--clear")
    cli("vm", "stop", "a")
    cli("host", "stop")
