"""A unit's sockets in luvmm's own init (luvmm.liveupdate.init: systemd's socket
units), and how a process of the unit tells them from its fd store
(luvmm.liveupdate.fdstore): bound once, at the unit's first start; the very same
socket passed to every process of the unit -- after a crash, beside the fd
store's files, and after a kexec; closed only when the unit stops.  Init
runs in this process, its units are real processes."""

import errno
import json
import os
import socket
import sys

import pytest
import trio

from luvmm.liveupdate.init import Init, SocketError
from luvmm.liveupdate.state import StateDir
from tests.e2e.test_metrics import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: The unit: it reports what it was passed; with $DIE_COLD it stores a file and dies at its
#: cold start; otherwise it stays up until it is stopped.
UNIT = r"""
import json, os, signal, socket, sys
from luvmm.liveupdate import fdstore

boot = os.environ["LUVMM_BOOT"]
names = os.environ.get("LISTEN_FDNAMES", "")
own_pid = os.environ.get("LISTEN_PID") == str(os.getpid()) or \
    os.environ.get(fdstore.LISTEN_PARENT_ENV) == str(os.getppid())  # meant for this process
fds = fdstore.listen_fds()
sockets = fdstore.sockets(fds)
report = {"boot": boot, "names": names, "own_pid": own_pid, "sockets": {}}
for name, fd in sockets.items():
    s = socket.socket(fileno=os.dup(fd))
    report["sockets"][name] = {"fd": fd, "port": s.getsockname()[1], "ino": os.fstat(fd).st_ino,
                               "listening": s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)}
    s.close()
stored = fdstore.take(fds)
report["stored"] = None if stored is None else sorted(stored[1])
out = os.path.join(os.environ["OUT"], f"{boot}.json")
with open(out + ".tmp", "w") as f:
    json.dump(report, f)
os.replace(out + ".tmp", out)
if boot == "cold" and os.environ.get("DIE_COLD"):
    fdstore.store({"ram": os.memfd_create("ram")}, {"pid": os.getpid()})
    os.kill(os.getpid(), signal.SIGKILL)
signal.pause()
"""


@pytest.fixture
def state(tmp_path):
    s = StateDir(str(tmp_path / "state"))
    s.ensure()
    yield s
    import ctypes

    # Init made this process a child subreaper: the tests after this one are not init.
    ctypes.CDLL(None, use_errno=True).prctl(36, 0, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def bindable(port: int) -> bool:
    """Whether a local user could bind 127.0.0.1:PORT (SO_REUSEADDR off)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            assert e.errno == errno.EADDRINUSE
            return False
    return True


def write_unit(state, tmp_path, port, env=None, **extra):
    program = tmp_path / "unit.py"
    program.write_text(UNIT)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    state.write_unit("vm-x", [sys.executable, str(program)], {"OUT": str(out), "PYTHONPATH": ROOT, **(env or {})},
                     restart="on-failure", fdstore_max=4, sockets=[{"name": "metrics", "listen": f"127.0.0.1:{port}"}],
                     **extra)
    return out


async def reported(out, boot: str) -> dict:
    path = out / f"{boot}.json"
    with trio.fail_after(60):
        while not path.exists():
            await trio.sleep(0.02)  # polling another process
    return json.loads(path.read_text())


async def test_a_units_socket_is_bound_once_and_passed_to_every_process_of_it_until_it_stops(state, tmp_path):
    port = free_port()
    out = write_unit(state, tmp_path, port, env={"DIE_COLD": "1"})
    init = Init(state)
    async with trio.open_nursery() as nursery:
        init.nursery = nursery
        init.listen_notify()
        nursery.start_soon(init.serve_notify)
        await init.start_unit("vm-x")
        ino = os.fstat(init.sockets["vm-x"]["metrics"][1].fileno()).st_ino
        first = await reported(out, "cold")
        assert first["names"] == "metrics" and first["own_pid"]
        assert first["sockets"] == {"metrics": {"fd": 3, "port": port, "ino": ino, "listening": 1}}
        assert first["stored"] is None
        # It stored a file and died: started again on it, the socket first (systemd's order), and
        # the reader takes the socket for no stored file.
        again = await reported(out, "restart")
        assert again["names"] == "metrics:ram:meta" and again["own_pid"]
        assert again["sockets"]["metrics"]["ino"] == ino and again["stored"] == ["ram"]
        assert not bindable(port)
        # An emulated kexec: every process of the unit gone, the socket still bound by init.
        await init.reap(init.kill_all())
        assert not bindable(port)
        await init.start_all("kexec")
        after = await reported(out, "kexec")
        assert after["names"] == "metrics" and after["sockets"]["metrics"]["ino"] == ino
        assert init.status()[0]["sockets"] == {"metrics": f"127.0.0.1:{port}"}
        await init.stop_unit("vm-x")  # stopped for good: its socket goes with it
        assert bindable(port) and "vm-x" not in init.sockets
        nursery.cancel_scope.cancel()
    init.notify_sock.close()


async def test_a_port_taken_fails_the_operators_start_in_one_line_but_not_a_boot(state, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = write_unit(state, tmp_path, port)
        init = Init(state)
        with pytest.raises(SocketError) as refused:
            await init.start_unit("vm-x")
        assert refused.value.errno == errno.EADDRINUSE
        assert refused.value.strerror == (f"cannot listen on 127.0.0.1:{port} for VM x's metrics: "
                                          "Address already in use: the VM was not started")
        assert init.procs == {} and init.sockets == {}  # nothing started, nothing left bound
        # At a boot (a kexec's, `luvmm boot`'s) the unit starts without it, and its log says why:
        # a VM is not kept down for its metrics port.
        await init.start_all("kexec")
        try:
            got = await reported(out, "kexec")
            assert got["names"] == "" and got["sockets"] == {}
            log = (state.logs / "vm-x.log").read_text()
            assert (f"init: started without its socket metrics: cannot listen on 127.0.0.1:{port}: "
                    "Address already in use") in log
        finally:
            await init.stop_all()


async def test_a_socket_dropped_from_the_unit_or_moved_is_let_go_at_its_next_start(state, tmp_path):
    port, other = free_port(), free_port()
    out = write_unit(state, tmp_path, port, pdeathsig="self")
    init = Init(state)
    try:
        await init.start_unit("vm-x")
        await reported(out, "cold")
        await init.reap(init.kill_all())
        write_unit(state, tmp_path, other)  # the unit's file names another port now
        await init.start_all("kexec")
        got = await reported(out, "kexec")
        assert got["sockets"]["metrics"]["port"] == other
        assert bindable(port) and not bindable(other)
    finally:
        await init.stop_all()
    assert bindable(other)


def test_a_stored_file_never_takes_a_sockets_name():
    from luvmm.liveupdate import fdstore

    r, w = os.pipe()
    passed = {"metrics": r, "ram": w}
    assert fdstore.sockets(passed) == {"metrics": r} and passed == {"ram": w}
    assert fdstore.take(passed) is None  # no meta: nothing stored, and what was passed is closed
    os.close(r)
    with pytest.raises(OSError):
        os.fstat(w)
