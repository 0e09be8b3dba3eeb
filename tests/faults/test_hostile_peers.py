"""Hostile peers and hard faults (issue 15): no message, flood, full disk or
dead process takes the host down or loses a VM.  Each test reproduces the
attack or the fault against real processes -- the daemon, the agent, VMMs --
bounded in count and time, on loopback only."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from luvmm.liveupdate.agent_client import AgentError, wait_for_agent
from luvmm.liveupdate.update import update_once
from luvmm import rpc
from luvmm.liveupdate.emu.client import connect
from luvmm.vmm import manage

from tests.support.vms import assert_intact, host_status, start_vm, wait_until
from tests.support.vms import wait_for_progress


def raw(path: str, data: bytes, timeout: float = 10):
    """Send bytes as one message on a fresh connection; the decoded reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendmsg([data])
        except BrokenPipeError:
            pass  # refused at once: the reason is waiting to be read
        reply, fds = rpc.recv(s)
    for fd in fds:
        os.close(fd)
    return reply


def serving(state) -> bool:
    host = connect(state.socket)
    try:
        return host.call({"op": "hello"})[0]["pid"] == state.pid()
    finally:
        host.close_connection()


# --- 1. one message must not kill the daemon --------------------------------------------------------


def test_requests_whose_replies_cannot_be_encoded_get_einval(emulated_host):
    state, host = emulated_host.state, emulated_host.host
    bdf = host.call({"op": "status"})[0]["kernel"]["vfio"][0]["bdf"]
    for bad in ({"t0": "nan", "t1": 1}, {"t0": -1e999, "t1": 1}, {"t0": 0, "t1": "inf"}, {"t0": [], "t1": 1},
                {"t0": True, "t1": 2}):
        for op in ("observe", "timeline"):
            reply = raw(state.socket, json.dumps({"op": op, "bdf": bdf, "bin_s": 0.1, **bad}).encode())
            assert reply["errno"] == errno.EINVAL, (op, bad, reply)
    reply = raw(state.socket, json.dumps({"op": "timeline", "bdf": bdf, "t0": 0, "t1": 1, "bin_s": 0}).encode())
    assert reply["errno"] == errno.EINVAL
    nested = b'{"op": "hello", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert raw(state.socket, nested[:200_000])["errno"] == errno.EINVAL  # deep, or cut off: either is EINVAL
    assert raw(state.socket, b'{"op": "status", "x": ' + b"[" * 100 + b"]" * 100 + b"}")["errno"] == errno.EINVAL
    assert serving(state)


# --- 2. file-descriptor exhaustion ------------------------------------------------------------------------


def _hold_connections(path: str, n: int) -> subprocess.Popen:
    """A process that opens n connections, prints how each went, and holds them."""
    code = f"""
import socket, sys, json
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))!r})
from luvmm import rpc
held, refused = [], {{}}
for i in range({n}):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect({path!r})
    try:
        rpc.call(s, {{"op": "hello"}}, timeout=10)
        held.append(s)
    except OSError as e:
        refused[e.errno] = refused.get(e.errno, 0) + 1
        s.close()
print(json.dumps({{"held": len(held), "refused": refused}}), flush=True)
sys.stdin.read()
"""
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


@pytest.mark.timeout(300)
def test_connection_floods_are_bounded_and_the_daemon_keeps_serving(emulated_host):
    from luvmm.liveupdate.emu.daemon import MAX_CONNECTIONS, MAX_CONNECTIONS_PER_PEER

    state = emulated_host.state
    procs = [_hold_connections(state.socket, 200)]
    got = json.loads(procs[0].stdout.readline())
    assert got == {"held": MAX_CONNECTIONS_PER_PEER, "refused": {str(errno.EMFILE): 200 - MAX_CONNECTIONS_PER_PEER}}
    # Many processes: the total is bounded too.
    per = MAX_CONNECTIONS_PER_PEER
    count = MAX_CONNECTIONS // per + 2
    procs += [_hold_connections(state.socket, per) for _ in range(count)]
    results = [json.loads(p.stdout.readline()) for p in procs[1:]]
    held = sum(r["held"] for r in results) + got["held"]
    assert held <= MAX_CONNECTIONS and any(str(errno.ENFILE) in r["refused"] for r in results)
    assert raw(state.socket, b'{"op": "hello"}')["errno"] == errno.ENFILE  # full: said, not a hang or a crash
    for p in procs:
        p.stdin.close()
        p.wait(30)
    assert serving(state)  # connections went with their processes


@pytest.mark.timeout(300)
def test_a_daemon_out_of_fds_answers_with_emfile_and_survives(emulated_host):
    import resource

    state, host = emulated_host.state, emulated_host.host
    pid = state.pid()
    used = len(os.listdir(f"/proc/{pid}/fd"))
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (used + 20, old[1]))
    try:
        procs = [_hold_connections(state.socket, 40) for _ in range(2)]
        results = [json.loads(p.stdout.readline()) for p in procs]
        refused = sum(r["refused"].get(str(errno.EMFILE), 0) for r in results)
        assert refused > 0, results
        # Emulated files cost the daemon an fd too: EMFILE, never EIO.
        opened = []
        with pytest.raises(OSError) as e:
            for _ in range(40):
                opened.append(host.open("/dev/iommu"))
        assert e.value.errno in (errno.EMFILE, errno.ENFILE)
        for fd in opened:
            os.close(fd)
        for p in procs:
            p.stdin.close()
            p.wait(30)
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, old)
    wait_until(lambda: _serves(state), "the daemon to serve again")  # it closes what the peers left


def _serves(state) -> bool:
    try:
        return serving(state)
    except OSError:
        return False


def test_the_daemon_raises_its_fd_limit(emulated_host):
    import resource

    soft, hard = resource.prlimit(emulated_host.state.pid(), resource.RLIMIT_NOFILE)
    assert soft == hard


def test_anyone_asking_the_agent_for_sessions_gets_eperm_and_costs_nothing(vm_host):
    state, conn = vm_host
    client, _ = wait_for_agent(state, 30)
    pid = state.pid()
    before = len(os.listdir(f"/proc/{pid}/fd"))
    try:
        for i in range(2000):
            with pytest.raises(AgentError) as e:
                client.call({"op": "create-session", "name": f"s{i}"})
            assert e.value.errno == errno.EPERM
        assert client.hello()["pid"] > 0
    finally:
        client.close()
    assert len(os.listdir(f"/proc/{pid}/fd")) <= before + 2
    assert host_status(conn)["kernel"]["sessions"] == []


# --- 4. a dead daemon ------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_when_the_daemon_dies_its_units_go_and_nothing_starts_over_it_silently(cli):
    cli("vm", "start", "a", "--guest", "synthetic", "--memory", "64M")
    units = [u["pid"] for u in json.loads(cli("host", "status", "--json").stdout)["units"]]
    # A process that left its unit (new session, double fork): nothing kills it when the daemon dies.
    escapee = os.path.join(cli.root, "escapee.pid")
    cli.keep(escapee)
    from luvmm.liveupdate.state import StateDir

    state = StateDir(cli.state)
    state.write_unit("vm-escape", [sys.executable, "-c", f"""
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        open({escapee!r}, "w").write(str(os.getpid()))
        time.sleep(600)
    os._exit(0)
time.sleep(600)
"""])
    host = connect(state.socket)
    host.call({"op": "unit-start", "name": "vm-escape"})
    host.close_connection()
    wait_until(lambda: os.path.exists(escapee) and open(escapee).read(), "the escapee")
    pid = int(open(escapee).read())
    os.kill(state.pid(), signal.SIGKILL)
    wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in units), "the units to die with the daemon")
    for args in (("vm", "status"), ("host", "status"), ("update",), ("vm", "start", "b", "--guest", "synthetic")):
        proc = cli(*args, status=1)
        assert "died" in cli.error_line(proc) and "luvmm host start" in proc.stderr, args
    assert os.path.exists(f"/proc/{pid}")  # the escapee lives on, orphaned
    proc = cli("host", "start")
    assert "had died" in proc.stderr and "stopped what was left of it (1 process" in proc.stderr
    assert "booting 2 VM(s)" in proc.stdout
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), "the escapee to be stopped")
    cli("vm", "stop", "escape")
    cli("vm", "stop", "a")
    cli("host", "stop")


# --- 5. watches ------------------------------------------------------------------------------------------------


def test_watches_are_bounded_and_go_with_their_connection(emulated_host):
    from luvmm.liveupdate.emu.observer import MAX_WATCHES, MAX_WATCHES_PER_OWNER

    state = emulated_host.state
    bdf = emulated_host.host.call({"op": "status"})[0]["kernel"]["vfio"][0]["bdf"]
    conns = []
    try:
        for n in range(MAX_WATCHES // MAX_WATCHES_PER_OWNER + 1):
            c = connect(state.socket)
            conns.append(c)
            for i in range(MAX_WATCHES_PER_OWNER):
                try:
                    c.call({"op": "watch", "bdf": bdf, "iova": (n * 100 + i) * 8})
                except OSError as e:
                    assert e.errno == errno.ENOSPC and n == MAX_WATCHES // MAX_WATCHES_PER_OWNER
            with pytest.raises(OSError) as e:
                c.call({"op": "watch", "bdf": bdf, "iova": 1 << 40})
            assert e.value.errno == errno.ENOSPC
        for c in conns:
            c.close_connection()
        conns = []
        c = connect(state.socket)  # the device is not in use: their watches went with them
        conns.append(c)
        for i in range(MAX_WATCHES_PER_OWNER):
            c.call({"op": "watch", "bdf": bdf, "iova": i * 8})
    finally:
        for c in conns:
            c.close_connection()


# --- 6. large replies -------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_status_of_thousands_of_sessions_is_delivered(emulated_host):
    import resource

    from luvmm.liveupdate.luo import LiveUpdate

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 3500:
        pytest.skip(f"needs 3500 fds (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    host = emulated_host.host
    luo = LiveUpdate.open(host)
    sessions = []
    try:
        for i in range(3000):
            sessions.append(luo.create_session(f"session-{i:05d}"))
        status = host.call({"op": "status"})[0]
        assert len(status["kernel"]["sessions"]) == 3000
        assert len(json.dumps(status)) > rpc.INLINE_MAX  # it came in a memfd
    finally:
        for s in sessions:
            s.close()
        luo.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- 7. malformed messages to the agent and to a VMM --------------------------------------------------------


@pytest.mark.timeout(300)
def test_malformed_messages_get_errors_from_the_agent_and_a_vmm(vm_host):
    state, conn = vm_host
    start_vm(state, conn, "m")
    agent_pid = wait_for_agent(state, 30)[1]["pid"]
    vmm_sock = str(state.vm_dir("m") / "vmm.sock")
    vmm_pid = manage.status(state, "m")["pid"]
    for path in (state.agent_socket, vmm_sock):
        for bad in (b"{", b"[", b'{"op": ', b"\xff", b"[" * 100_000, b'{"a": ' + b"[" * 1000 + b"]" * 1000 + b"}",
                    b'{"op": 5}', b"[1]", b'"x"'):
            assert raw(path, bad)["errno"] == errno.EINVAL, (path, bad[:20])
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:  # longer than any message: cut
            s.settimeout(10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.connect(path)
            s.sendmsg([b"{" + b" " * (300 * 1024) + b"}"])
            assert rpc.recv(s)[0]["errno"] == errno.EINVAL
    assert wait_for_agent(state, 30)[1]["pid"] == agent_pid  # the same agent serves
    assert manage.status(state, "m")["pid"] == vmm_pid
    restarts = {u["name"]: u["restarts"] for u in conn.call({"op": "units"})[0]}
    assert restarts["agent"] == 0 and restarts["vm-m"] == 0


# --- 8. the fd store outlives the agent --------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("gap", [0.0, 0.3, 0.6])
def test_a_vmm_killed_after_its_agent_comes_back_on_its_vm(kvm_ok, vm_host, gap):
    state, conn = vm_host
    st = start_vm(state, conn, "k", guest="firmware")
    before = wait_for_progress(state, "k", st["mailbox"])
    units = {u["name"]: u for u in conn.call({"op": "units"})[0]}
    os.kill(units["agent"]["pid"], signal.SIGKILL)
    time.sleep(gap)  # the spacing of the two kills is the test's parameter, not a wait for something
    os.kill(units["vm-k"]["pid"], signal.SIGKILL)
    now = wait_until(lambda: _restarted(state, st["pid"]), "the VMM to come back")
    assert now["boot"] == "restart"  # not a cold boot: the same RAM and device
    after = wait_for_progress(state, "k", before)
    assert after["recoveries"] == before["recoveries"] + 1 and after["completed"] > before["completed"]
    assert after["errors"] == 0 and after["verify_failures"] == 0
    report = update_once(state, timeout=60)["reports"]["k"]
    assert report["guest_progressed"] and report["dma_lost"] == 0


def _restarted(state, old_pid):
    try:
        st = manage.status(state, "k")
    except (OSError, manage.VmError):
        return None
    return st if st["pid"] != old_pid and st["ready"] else None


# --- 9. an update can always be abandoned --------------------------------------------------------------------


def test_an_update_stuck_restoring_is_abandoned_by_a_command(cli):
    cli("vm", "start", "a", "--guest", "synthetic", "--memory", "64M")
    from luvmm.liveupdate.state import StateDir

    state = StateDir(cli.state)
    stuck = {"id": "stuck", "vms": ["a", "gone"], "phase": "restoring", "reports": {}, "kexec_started": time.time()}
    state.make_dir("agent")
    state.write_file("agent/update.json", json.dumps(stuck).encode())
    agent = next(u for u in json.loads(cli("host", "status", "--json").stdout)["units"] if u["name"] == "agent")
    os.kill(agent["pid"], signal.SIGKILL)  # the next agent reads the stuck record
    wait_until(lambda: _agent_update(state) == "stuck", "the new agent")
    proc = cli("update", "--abandon")
    assert "update stuck: failed" in proc.stdout and "abandoned" in proc.stdout
    update = json.loads(cli("update", "--json").stdout)
    assert update["cycles"][0]["guest_progressed"]
    cli("vm", "stop", "a")
    cli("host", "stop")


def _agent_update(state):
    try:
        client, hello = wait_for_agent(state, 5)
    except OSError:
        return None
    client.close()
    return (hello.get("update") or {}).get("id")


# --- 10. a full disk ------------------------------------------------------------------------------------


@pytest.fixture
def full_disk_host(tmp_path):
    """A host whose state dir is a small tmpfs (root only), and a way to fill it."""
    from luvmm.liveupdate.emu import hostctl
    from luvmm.liveupdate.state import StateDir

    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(path)],
                      capture_output=True).returncode:
        pytest.skip("needs to mount a tmpfs (root)")
    state = StateDir(str(path))
    try:
        hostctl.start(state, dsa_bandwidth=48 << 20)
        conn = connect(state.socket)

        def fill():
            with open(path / "filler", "wb", buffering=0) as f:  # nothing left to flush at close
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError as e:
                    assert e.errno == errno.ENOSPC

        try:
            yield state, conn, fill, lambda: os.unlink(path / "filler")
        finally:
            conn.close_connection()
            if os.path.exists(path / "filler"):
                os.unlink(path / "filler")
            hostctl.stop(state)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.timeout(300)
def test_a_full_disk_fails_soft_and_an_update_after_prepare_resumes_every_vm(kvm_ok, full_disk_host):
    state, conn, fill, free = full_disk_host
    st = start_vm(state, conn, "d", guest="firmware")  # a guest that can be restarted on its RAM
    fill()
    with pytest.raises(AgentError) as e:
        update_once(state, timeout=30)
    assert e.value.errno == errno.ENOSPC and "rolled back" in str(e.value)
    now = manage.status(state, "d")
    assert not now["prepared"] and now["guest_state"] == "running"  # resumed, and said so truly
    assert_intact(state, "d", st)
    # A unit that dies while the disk is full: its log cannot be written; init starts it anyway.
    os.kill(now["pid"], signal.SIGKILL)
    wait_until(lambda: _restarted_vm(state, "d", now["pid"]), "the VMM to come back")
    status = host_status(conn)
    assert status["pid"] == state.pid()  # the daemon lived through it
    free()
    assert update_once(state, timeout=60)["reports"]["d"]["guest_progressed"]


def _restarted_vm(state, name, old_pid):
    try:
        st = manage.status(state, name)
    except (OSError, manage.VmError):
        return None
    return st if st["pid"] != old_pid and st["ready"] else None


# --- 11. one stopped VMM does not hold the others paused ------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("vm_host", [{"devices": 2}], indirect=True)
def test_a_stopped_vmm_does_not_pause_the_others(vm_host):
    state, conn = vm_host
    a = start_vm(state, conn, "a")
    b = start_vm(state, conn, "b")
    os.kill(b["pid"], signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(AgentError) as e:
            update_once(state, timeout=3)
        assert time.monotonic() - started < 30
        assert "not ready, nothing paused" in str(e.value) and "b did not answer" in str(e.value)
        assert manage.status(state, "a")["updates_prepared"] == 0  # a never paused
        assert_intact(state, "a", a)
    finally:
        os.kill(b["pid"], signal.SIGCONT)
    report = update_once(state, timeout=60)["reports"]
    assert report["a"]["guest_progressed"] and report["b"]["guest_progressed"]


# --- 14, 15. the state dir ---------------------------------------------------------------------------------


def test_a_state_dir_of_another_user_or_under_a_writable_parent_is_refused(cli):
    theirs = os.path.join(cli.root, "theirs")
    os.mkdir(theirs, 0o700)
    os.chown(theirs, 65534, 65534)
    cli.keep(theirs)
    for args in (("host", "start"), ("vm", "start", "a", "--guest", "synthetic"), ("host", "status")):
        proc = cli(*args, "--state-dir", theirs, status=1)
        assert "belongs to uid 65534, not to you" in cli.error_line(proc), args
    open_parent = os.path.join(cli.root, "open")
    os.mkdir(open_parent)
    os.chmod(open_parent, 0o777)
    cli.keep(open_parent)
    proc = cli("host", "start", "--state-dir", os.path.join(open_parent, "s"), status=1)
    assert "may be changed by other users" in cli.error_line(proc)
    assert os.listdir(open_parent) == []


def test_symlinks_in_the_state_dir_are_refused_not_followed(cli):
    outside = os.path.join(cli.root, "outside.json")
    with open(outside, "w") as f:
        f.write("precious\n")
    cli.keep(outside)
    cli("vm", "start", "a", "--guest", "synthetic", "--memory", "64M")
    cli("host", "stop")  # a's definition stays; plant links in the stopped host's state
    os.makedirs(os.path.join(cli.state, "vms", "c"))
    os.symlink(outside, os.path.join(cli.state, "vms", "c", "config.json"))
    proc = cli("host", "start", status=1)
    assert "is a symlink" in cli.error_line(proc)
    os.unlink(os.path.join(cli.state, "vms", "c", "config.json"))
    os.rmdir(os.path.join(cli.state, "vms", "c"))
    logs = os.path.join(cli.state, "logs")
    os.rename(logs, logs + ".real")
    os.symlink(cli.root, logs)
    proc = cli("vm", "start", "b", "--guest", "synthetic", status=1)
    assert f"{logs} is a symlink" in cli.error_line(proc)
    os.unlink(logs)
    os.rename(logs + ".real", logs)
    assert open(outside).read() == "precious\n"
    cli("host", "start")
    cli("vm", "stop", "a")
    cli("host", "stop")


def test_a_unit_whose_log_cannot_be_written_starts_anyway_and_status_says_why(emulated_host):
    state, conn = emulated_host.state, emulated_host.host
    os.mkdir(state.logs / "vm-nolog.log")  # not a file: the log cannot be opened, as on a full or broken disk
    state.write_unit("vm-nolog", [sys.executable, "-c", "import time; time.sleep(60)"])
    conn.call({"op": "unit-start", "name": "vm-nolog"})
    unit = next(u for u in conn.call({"op": "units"})[0] if u["name"] == "vm-nolog")
    assert unit["running"]
    status = conn.call({"op": "status"})[0]
    assert "vm-nolog's log" in status["disk_error"]
    from luvmm.liveupdate.emu.hostctl import format_status

    assert "disk: unit vm-nolog's log" in format_status(status)
    conn.call({"op": "unit-stop", "name": "vm-nolog"})


def test_no_agent_means_none_and_a_stopped_host_leaves_no_update_behind(cli):
    cli("host", "start")
    cli("host", "stop")
    from luvmm.liveupdate.state import StateDir

    state = StateDir(cli.state)
    state.ensure()
    state.write_unit("agent", [sys.executable, "-c", "import time; time.sleep(60)"])  # left by an earlier host
    state.make_dir("agent")
    state.write_file("agent/update.json", json.dumps({"id": "old", "vms": ["x"], "phase": "restoring",
                                                      "reports": {}}).encode())
    cli("host", "start", "--no-agent")
    assert [u["name"] for u in json.loads(cli("host", "status", "--json").stdout)["units"]] == []
    cli("host", "stop")
    assert not os.path.exists(cli.state)  # the old update record went with the host that stopped


@pytest.mark.timeout(300)
def test_a_connection_flood_on_the_agent_is_bounded_too(vm_host):
    state, conn = vm_host
    agent_pid = wait_for_agent(state, 30)[1]["pid"]
    proc = _hold_connections(state.agent_socket, 150)
    got = json.loads(proc.stdout.readline())
    assert got == {"held": 64, "refused": {str(errno.EMFILE): 150 - 64}}
    proc.stdin.close()
    proc.wait(30)
    assert wait_for_agent(state, 30)[1]["pid"] == agent_pid  # the same agent, still serving
