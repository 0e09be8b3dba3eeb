"""Init: luvmm's own init -- the userspace supervisor of a host's units.

Two hosts run it: the emulated host's daemon (luvmm.liveupdate.emu.daemon, which
kills every unit at each of its emulated kexecs and starts them again), and
`luvmm boot` (luvmm.liveupdate.boot) on a real host without systemd, over the real
kernel.  On a host with systemd, systemd plays this part with the same
policy (luvmm/wiring/systemd.py).

It starts every unit of the state dir's ``units/`` (the agent, one VMM per
VM) with the environment a unit needs to find its host (what its host adds:
``LUVMM_HOST_SOCKET`` on the emulated host, ``LUVMM_INIT_SOCKET`` under
`luvmm boot`; and ``LUVMM_STATE_DIR``) and to know how it was started
(``LUVMM_BOOT`` = ``cold`` or ``kexec``, ``LUVMM_GENERATION``).
:meth:`Init.kill_all` SIGKILLs each unit's whole process group when the
host stops, and stops them (SIGSTOP) at an emulated kexec -- a process of
the old kernel does not run again, and nothing it did not preserve
survives -- to be killed by :meth:`Init.bury` once the new units' guests run.

A unit with ``"restart": "on-failure"`` (systemd's Restart=on-failure) that
exits with a failure or is killed is started again with ``LUVMM_BOOT=restart``
-- unless it exits with EX_CONFIG (78: what it was asked to run cannot run;
systemd's RestartPreventExitStatus=)
-- at most RESTART_BURST times in RESTART_INTERVAL seconds (StartLimitBurst,
StartLimitIntervalSec), or, for a unit with ``"start_limit_burst": 0`` and
``"restart_max_delay_sec"``, without a limit but ever more slowly
(RestartSteps=, RestartMaxDelaySec=): luvmm's own units, which a host cannot
do without.  A VMM started so picks its VM up from its unit's file descriptor store.

The **file descriptor store** is systemd's (FileDescriptorStoreMax=): a unit
with ``"fdstore_max": N`` may leave up to N fds with init by ``sd_notify``
-- ``FDSTORE=1``/``FDNAME=``, ``FDSTOREREMOVE=1`` -- on the datagram socket
``$NOTIFY_SOCKET`` (``DIR/notify.sock``); when init starts the unit again
after a failure it passes them from fd 3 on, with ``LISTEN_FDS``,
``LISTEN_FDNAMES`` and ``LISTEN_PID``.  Stopping the unit flushes its
store, and so does a kexec (init itself is gone then).  The sender of a
notification is the process the kernel names in its SCM_CREDENTIALS; a
process of no unit stores nothing.

A unit's **sockets** are systemd's socket units (ListenStream=,
FileDescriptorName=, Accept=no): a unit with ``"sockets": [{"name":
"metrics", "listen": "127.0.0.1:9100"}]`` gets a TCP socket that init binds
and listens on when it starts the unit the first time, and passes to every
process it starts for the unit, from fd 3 on (before the fd store's files,
as systemd orders them), named in ``LISTEN_FDNAMES``.  The socket is the
unit's, not its process's: it stays bound while the unit's processes die and
are started again -- at a restart, and at the emulated host's kexecs
(:meth:`Init.kill_all`: the emulated machine's userspace goes, but a local
user outside it never sees the port free) -- and is closed only when the
unit is stopped (:meth:`Init.stop_unit`, :meth:`Init.stop_all`).  So no
process of the unit ever binds it, and there is no moment between two of
them when someone else could (a VMM's metrics port, taken over by a local
user across a live update, would serve Prometheus the user's figures).  A
socket that cannot be bound fails the unit's start asked for by the
operator (``unit-start``: `luvmm vm start` says so and leaves nothing);
at a boot or a restart the unit starts without it and says so in its log:
a VM is not left down for its metrics endpoint (its VMM binds the port
itself, and reports it when it cannot).

Init is a **child subreaper** (PR_SET_CHILD_SUBREAPER): a process that forks
out of its unit is re-parented to init, not to pid 1, so it still belongs to
no operator (:meth:`Init.unit_of`), and init reaps it when it exits.  And a
unit does not outlive its init: its process gets SIGKILL when init dies
(PR_SET_PDEATHSIG: set by the unit itself where it says so, ``"pdeathsig":
"self"``, as luvmm's own units do; else through util-linux's setpriv), as
every process of a real machine stops with it.

Its control requests (``units``, ``unit-of``, ``unit-start``, ``unit-stop``:
:meth:`Init.request`, authorized by :func:`authorize`) are served by its
host on that host's socket; luvmm.services.InitUnits is their client.

Why this long: it is a supervisor with as much of systemd's surface as luvmm's
units use -- start, restart and its limits, the fd store, sockets bound for a
unit, process groups and their killing, who a peer is -- around one table of
units that all of them share. Splitting it by concern is still to do (issue
25, item 3).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import socket
import struct
import time

import trio

from luvmm.liveupdate.fdstore import LISTEN_PARENT_ENV
from luvmm.liveupdate.state import check_unit_name, guest_cpus
from luvmm.names import parse_listen

log = logging.getLogger("luvmm.init")
EX_CONFIG = 78  # sysexits.h: a unit that exits so is not restarted
RESTART_BURST = 5
RESTART_INTERVAL = 10.0
#: What unit_of says of a process re-parented to init after it left its
#: unit (a double fork): some unit's, but which one is not known.
ORPHAN = "?orphan"
PR_SET_CHILD_SUBREAPER = 36  # include/uapi/linux/prctl.h
SD_LISTEN_FDS_START = 3
_FDSTORE_TMP_BASE = 1000  # passed fds are moved above this before a spawn dup2()s them to 3, 4, ...
#: listen(2)'s backlog of a unit's socket: systemd's Backlog= default (the kernel caps it at net.core.somaxconn).
SOCKET_BACKLOG = 4096


class SocketError(OSError):
    """A unit's socket cannot be bound: ``where`` (ADDRESS:PORT), the kernel's errno."""

    def __init__(self, err: int, strerror: str, where: str):
        super().__init__(err, strerror)
        self.where = where


def listen_stream(spec: str) -> socket.socket:
    """A TCP socket listening on ``spec`` (:func:`parse_listen`), made as
    systemd makes a ListenStream= socket: SO_REUSEADDR (an init started again
    binds over its old connections in TIME_WAIT; no one else can bind the
    port while it listens, SO_REUSEADDR or not), IPV6_V6ONLY on an IPv6
    address (BindIPv6Only=ipv6-only: what the VMM's own bind does), close-on-
    exec (init passes it by dup2).  SocketError if it cannot be bound."""
    address, port = parse_listen(spec, "socket address")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    where = f"[{address}]:{port}" if family == socket.AF_INET6 else f"{address}:{port}"
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(SOCKET_BACKLOG)
    except OSError as e:
        sock.close()
        raise SocketError(e.errno or errno.EIO, e.strerror or str(e), where) from None
    return sock


def last_in_line(pid: int) -> None:
    """Every thread of process ``pid`` under SCHED_IDLE -- it runs only when
    no other task wants its CPU -- and off the CPUs set apart for the guests
    (luvmm.liveupdate.state.guest_cpus), where any are.  For the old kernel's
    processes, killed once the new units' guests run: their teardown is the
    emulated machine's, which a real kexec does not have, and it must not
    take CPU from a guest, nor from the emulated devices the guest waits
    on.  A thread gone meanwhile is no matter."""
    cpus = guest_cpus()
    rest = frozenset(range(os.cpu_count() or 1)) - cpus
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    idle = os.sched_param(0)
    for tid in tids:
        try:
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, idle)
            if cpus and rest:
                os.sched_setaffinity(int(tid), rest)
        except (OSError, ValueError):
            pass


def _killpg(procs: list, sig: int) -> None:
    """``sig`` to the process group of each of ``procs`` still running (or stopped)."""
    for proc in procs:
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass


class UnitProcess:
    """A unit's process, started with posix_spawn and waited for through a pidfd.

    Not trio.lowlevel.open_process: that runs subprocess.Popen in a worker
    thread, and after a kexec the units' start is on the blackout's path --
    posix_spawn (vfork + exec) starts one in about a millisecond.
    """

    #: pids of unit processes not reaped yet (not orphans: their pidfds reap them).
    live: set[int] = set()

    def __init__(self, argv: list[str], env: dict[str, str], log_fd: int, pass_fds: list[int] = ()):
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_DUP2, log_fd, 1),
                   (os.POSIX_SPAWN_DUP2, log_fd, 2)]
        actions += [(os.POSIX_SPAWN_DUP2, fd, SD_LISTEN_FDS_START + i) for i, fd in enumerate(pass_fds)]
        self.pid = os.posix_spawnp(argv[0], argv, env, setsid=True, file_actions=actions)
        self.started = time.monotonic()
        UnitProcess.live.add(self.pid)
        self.pidfd = os.pidfd_open(self.pid)
        self.returncode: int | None = None
        self._waiting: trio.Event | None = None  # set when the task reading the pidfd is done

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                UnitProcess.live.discard(pid)
                self.returncode = os.waitstatus_to_exitcode(status)
                trio.lowlevel.notify_closing(self.pidfd)
                os.close(self.pidfd)
        return self.returncode

    async def wait(self) -> int:
        """Any number of tasks may wait (the restart watcher, a kexec's reaping):
        one of them reads the pidfd, the others wait for it."""
        while self.poll() is None:
            if self._waiting is not None:
                await self._waiting.wait()
                continue
            self._waiting = waiting = trio.Event()
            try:
                await trio.lowlevel.wait_readable(self.pidfd)
            except trio.ClosedResourceError:
                pass  # poll() reaped it meanwhile
            finally:
                self._waiting = None
                waiting.set()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self.pidfd, sig)


#: Who may ask what of init (:func:`authorize`): reading its units is anyone's
#: on its socket; which unit a process is, the agent's (it authorizes its
#: VMMs by it) and the operator's; starting and stopping units, the operator's.
ANYONE_OPS = frozenset({"units"})
AGENT_OPS = frozenset({"unit-of"})
OPERATOR_OPS = frozenset({"unit-start", "unit-stop"})
OPS = ANYONE_OPS | AGENT_OPS | OPERATOR_OPS


def authorize(op: str, peer) -> bool:
    """Whether ``peer`` (luvmm.peer.Peer; its ``unit`` None: the operator,
    a process of no unit) may ask init for ``op`` (one of :data:`OPS`):
    the trust model of docs/faults-and-security.md, the same on every host init runs on."""
    if op in ANYONE_OPS:
        return True
    if op in AGENT_OPS:
        return peer.unit in (None, "agent")
    return op in OPERATOR_OPS and peer.unit is None


class Init:
    """``generation``: a callable giving the host's generation now (its
    kernel's: the emulated host counts its kexecs), in each unit's
    ``LUVMM_GENERATION`` -- what tells an old kernel's processes from the
    new one's.  ``unit_env``: what the host adds to every unit's
    environment so that it finds its host (``LUVMM_HOST_SOCKET``,
    ``LUVMM_INIT_SOCKET``).  ``keep_going``: a unit that cannot be spawned
    at boot or at a restart (its program is gone) is logged and left
    stopped, and init goes on with the others -- a real host's init must not
    leave the agent and every VM down for one broken unit file; without it
    the error is the caller's (the emulated host's daemon fails at once)."""

    #: Variables of init's own environment that are never a unit's: each
    #: host sets its own (unit_env), and the fd store's are per start.
    _NOT_INHERITED = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", LISTEN_PARENT_ENV, "NOTIFY_SOCKET",
                      "LUVMM_HOST_SOCKET", "LUVMM_INIT_SOCKET")

    def __init__(self, state, *, generation=lambda: 0, unit_env: dict[str, str] | None = None,
                 keep_going: bool = False):
        self.state = state
        self.keep_going = keep_going
        self.generation = generation
        self.unit_env = dict(unit_env or {})
        self.procs: dict[str, UnitProcess] = {}
        self.started: dict[str, float] = {}
        self.starts: dict[str, int] = {}
        self.restarts: dict[str, list[float]] = {}  # recent restarts, for the limit
        self.restart_count: dict[str, int] = {}
        #: unit name -> (its last failure's cause, how many times in a row it failed so).
        self.same_failures: dict[str, tuple[str, int]] = {}
        #: unit name -> why init gave up on it (its start clears it).
        self.failed: dict[str, str] = {}
        self.nursery: trio.Nursery | None = None  # its host's: it watches units for the restart policy
        #: unit name -> {fd name: fd}: each unit's file descriptor store.
        self.fdstores: dict[str, dict[str, int]] = {}
        #: unit name -> {fd name: (listen, socket)}: each unit's sockets, bound at its first start.
        self.sockets: dict[str, dict[str, tuple[str, socket.socket]]] = {}
        #: Units whose current process said READY=1 (sd_notify), and when.
        self.ready: dict[str, float] = {}
        self.ready_changed = trio.Event()
        #: main pids of units that exited lately -> unit: a notification sent just before dying counts.
        self._exited: dict[int, str] = {}
        self.notify_sock: socket.socket | None = None
        #: Set by stop_all: its host is going, no unit starts again.
        self.stopping = False
        #: Why the last write of a unit's log failed (a full disk), or None.
        self.log_error: str | None = None
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        except (OSError, AttributeError):
            pass
        import shutil

        setpriv = shutil.which("setpriv")
        #: What every unit's argv starts with: SIGKILL when init dies.
        self.wrapper = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []

    def _env(self, unit: dict, boot: str) -> dict[str, str]:
        env = dict(os.environ)
        # Units keep their compiled bytecode (in the state dir, not the source
        # tree): without it a restored VMM spends ~50 ms compiling its modules
        # again during the blackout.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(self.state.path) + "/pycache"
        for name in self._NOT_INHERITED:
            env.pop(name, None)
        env.update({str(k): str(v) for k, v in unit.get("env", {}).items()})
        env.update(self.unit_env)
        env.update(LUVMM_STATE_DIR=self.state.path, LUVMM_BOOT=boot,
                   LUVMM_GENERATION=str(self.generation()), LUVMM_UNIT=unit["name"],
                   LUVMM_INIT_PID=str(os.getpid()))
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", LISTEN_PARENT_ENV, "NOTIFY_SOCKET"):
            env.pop(name, None)
        if unit.get("fdstore_max"):
            env["NOTIFY_SOCKET"] = self.notify_path
        return env

    @property
    def notify_path(self) -> str:
        return os.path.join(self.state.runtime, "notify.sock")

    def _open_log(self, name: str) -> int:
        """The unit's log, or /dev/null when it cannot be written (a full or
        read-only disk): a unit starts whatever its log can take, and
        `luvmm host status` says why its output is lost."""
        try:
            fd = os.open(self.state.logs / f"{name}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                         | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            self._log_failed(name, e)
            return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        return fd

    def _log_failed(self, name: str, e: OSError) -> None:
        self.log_error = f"unit {name}'s log: {e.strerror or e}"
        log.error("cannot write %s", self.log_error)

    def _unit_sockets(self, unit: dict, strict: bool) -> tuple[dict[str, int], list[str]]:
        """({fd name: fd}, why not) of the unit's sockets, bound now if they
        are not yet (or if the unit's file names another address now).  A
        socket that cannot be bound is SocketError if ``strict`` (the
        operator's start: one line, naming the address, and none of the
        unit's sockets left bound), else left out, and why is in the list."""
        name = unit["name"]
        held = self.sockets.setdefault(name, {})
        fds, failed = {}, []
        try:
            specs = [(str(spec["name"]), str(spec["listen"])) for spec in unit.get("sockets") or ()]
        except (KeyError, TypeError):
            if strict:
                self.close_sockets(name)
                raise SocketError(errno.EINVAL, f"unit {name}: malformed sockets (want name and listen)", "") from None
            specs = []
            failed.append("its sockets: malformed (want name and listen)")
        for fdname in set(held) - {fdname for fdname, _ in specs}:  # no longer the unit's
            held.pop(fdname)[1].close()
        for fdname, listen in specs:
            if fdname in held and held[fdname][0] != listen:
                held.pop(fdname)[1].close()
            if fdname not in held:
                try:
                    held[fdname] = (listen, listen_stream(listen))
                except (SocketError, ValueError) as e:
                    where = getattr(e, "where", listen)
                    why = e.strerror if isinstance(e, OSError) else str(e)
                    if strict:
                        self.close_sockets(name)
                        vm = name[3:] if name.startswith("vm-") else None  # what `luvmm vm start` started
                        what = f"VM {vm}'s {fdname}" if vm else f"unit {name}'s socket {fdname}"
                        raise SocketError(getattr(e, "errno", errno.EINVAL),
                                          f"cannot listen on {where} for {what}: {why}: "
                                          f"the {'VM' if vm else 'unit'} was not started", where) from None
                    failed.append(f"its socket {fdname}: cannot listen on {where}: {why}")
                    continue
            fds[fdname] = held[fdname][1].fileno()
        if not held:
            del self.sockets[name]
        return fds, failed

    def close_sockets(self, name: str | None = None) -> None:
        """Close unit ``name``'s sockets (None: every unit's): it is stopped for good, or its host is."""
        for unit in [name] if name is not None else list(self.sockets):
            for _, sock in self.sockets.pop(unit, {}).values():
                sock.close()

    def _start(self, unit: dict, boot: str, *, strict: bool = False) -> int:
        name = unit["name"]
        if boot != "restart":  # started anew (asked for, or a new kernel's boot): its failures are history
            self.failed.pop(name, None)
            self.same_failures.pop(name, None)
        sockets, failed = self._unit_sockets(unit, strict)  # before anything else: a failed start leaves nothing
        log_fd = self._open_log(name)
        stored = self.fdstores.get(name, {}) if boot == "restart" else {}
        # systemd's order (service_collect_fds): the sockets, then the fd store; a stored fd does not
        # take a socket's name (Init._notified refuses it).
        passed = dict(sockets, **{k: v for k, v in stored.items() if k not in sockets})
        env = self._env(unit, boot)
        moved = []
        try:
            try:
                os.write(log_fd, f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} start ({boot}, generation "
                                 f"{self.generation()}) ---\n".encode())
                for why in failed:
                    os.write(log_fd, f"init: started without {why}\n".encode())
            except OSError as e:
                self._log_failed(name, e)
            for why in failed:
                log.error("unit %s starts without %s", name, why)
            if passed:
                # Above any number the spawn dup2()s to, so that none is overwritten first.
                moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _FDSTORE_TMP_BASE) for fd in passed.values()]
                env.update(LISTEN_FDS=str(len(moved)), LISTEN_FDNAMES=":".join(passed))
            argv = [str(a) for a in unit["argv"]]
            if moved:
                # Not LISTEN_PID: the new process's pid is known only once it exists
                # (a /bin/sh shim setting it costs ~0.85 ms, on the blackout's path
                # after a kexec).  The fds are for the process whose parent is init
                # (luvmm.liveupdate.fdstore.listen_fds): not a child of the unit.
                env[LISTEN_PARENT_ENV] = str(os.getpid())
            # A unit that sets PR_SET_PDEATHSIG itself (luvmm.liveupdate.state.die_with_init, as luvmm's
            # own do) is spared the wrapper's exec: after a kexec it is on the blackout's path.
            wrapper = [] if unit.get("pdeathsig") == "self" else self.wrapper
            proc = UnitProcess(wrapper + argv, env, log_fd, moved)
        finally:
            os.close(log_fd)
            for fd in moved:
                os.close(fd)
        self.procs[name] = proc
        self.ready.pop(name, None)  # not until this process says so (READY=1)
        self.started[name] = time.time()
        self.starts[name] = self.starts.get(name, 0) + 1
        if unit.get("restart") == "on-failure" and self.nursery is not None:
            self.nursery.start_soon(self._watch, name, proc)
        return proc.pid

    # --- the file descriptor store (sd_notify) ------------------------------------------------

    def listen_notify(self) -> None:
        path = self.state.runtime_path("notify.sock")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        self.notify_sock = sock

    async def serve_notify(self) -> None:
        sock = trio.socket.from_stdlib_socket(self.notify_sock)
        while True:
            await trio.lowlevel.wait_readable(sock)
            self.drain_notify()

    def drain_notify(self) -> None:
        """Take every notification queued (also before a dead unit is
        restarted: what it stored just before dying is passed on)."""
        while True:
            try:
                data, anc, flags, _ = self.notify_sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4)
                                                               + socket.CMSG_SPACE(12), socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.error("notify socket: %s", e)
                return
            fds, pid = [], None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += struct.unpack(f"{len(payload) // 4}i", payload[:len(payload) // 4 * 4])
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= 12:
                    pid = struct.unpack_from("i", payload)[0]
            try:
                self._notified(data, fds, pid, flags)
            except Exception:  # noqa: BLE001 -- a unit's datagram must never take init down
                log.exception("notification from pid %s", pid)
                for fd in fds:
                    os.close(fd)

    def _notified(self, data: bytes, fds: list[int], pid: int | None, flags: int) -> None:
        unit = self._exited.get(pid) or (self.unit_of(pid) if pid else None)
        fields = dict(line.split("=", 1) for line in data.decode(errors="replace").split("\n") if "=" in line)
        if unit in (None, ORPHAN) or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            log.warning("notification from pid %s (unit %s) ignored", pid, unit)
            for fd in fds:
                os.close(fd)
            return
        if fields.get("READY") == "1":
            # sd_notify's READY=1: a VMM says so once its guest runs again.
            self.ready[unit] = time.time()
            self.ready_changed.set()
            self.ready_changed = trio.Event()
        name = fields.get("FDNAME", "stored")
        store = self.fdstores.setdefault(unit, {})
        if fields.get("FDSTOREREMOVE") == "1":
            old = store.pop(name, None)
            if old is not None:
                os.close(old)
        if fields.get("FDSTORE") == "1" and fds:
            spec = next((u for u in self.state.read_units() if u["name"] == unit), {})
            limit = spec.get("fdstore_max", 0)
            old = store.pop(name, None)
            if old is not None:
                os.close(old)
            sockets = {str(s.get("name")) for s in spec.get("sockets") or ()}  # a stored fd is never taken for one
            if len(store) >= limit or len(fds) != 1 or not name.isprintable() or ":" in name or name in sockets:
                log.warning("unit %s: fd store refused %r (FileDescriptorStoreMax=%d)", unit, name, limit)
                for fd in fds:
                    os.close(fd)
                return
            store[name] = fds[0]
            return
        for fd in fds:
            os.close(fd)

    def flush_fdstore(self, name: str) -> None:
        for fd in self.fdstores.pop(name, {}).values():
            os.close(fd)

    async def _watch(self, name: str, proc: UnitProcess) -> None:
        code = await proc.wait()
        self._exited[proc.pid] = name
        while len(self._exited) > 256:
            del self._exited[next(iter(self._exited))]
        if self.notify_sock is not None:
            self.drain_notify()  # what it stored before it died
        if self.procs.get(name) is not proc or code in (0, EX_CONFIG):
            if self.procs.get(name) is proc:
                self.flush_fdstore(name)  # done for good: nobody will take the files
            return  # stopped, killed by a kexec, done, or not worth another try
        unit = next((u for u in self.state.read_units() if u["name"] == name), None)
        if unit is None or unit.get("restart") != "on-failure":
            return
        if self._same_failure_again(unit, proc, code):
            self.flush_fdstore(name)
            return
        now = time.monotonic()
        recent = [t for t in self.restarts.get(name, []) if now - t < RESTART_INTERVAL]
        burst = unit.get("start_limit_burst", RESTART_BURST)
        if burst and len(recent) >= burst:
            log.error("unit %s failed %d times in %.0f s: not restarting it", name, len(recent), RESTART_INTERVAL)
            self.flush_fdstore(name)
            return
        self.restarts[name] = recent + [now]
        self.restart_count[name] = self.restart_count.get(name, 0) + 1
        # RestartSec= growing towards RestartMaxDelaySec= (systemd's RestartSteps=): a unit
        # that keeps failing is started again, ever more slowly, never given up on.
        delay = 0.0
        if unit.get("restart_max_delay_sec") and len(recent) >= RESTART_BURST:
            delay = min(float(unit["restart_max_delay_sec"]), 0.05 * 2 ** (len(recent) - RESTART_BURST))
        log.warning("unit %s exited (%s): restarting it%s", name, f"signal {-code}" if code < 0 else
                    f"status {code}", f" in {delay:.2f} s" if delay else "")
        if delay:
            await trio.sleep(delay)  # the restart's own delay (RestartSec=), not a wait for something
            if self.stopping or self.procs.get(name) is not proc or \
                    not any(u["name"] == name for u in self.state.read_units()):
                return  # started or stopped meanwhile
        self._start_or_log(unit, "restart")

    def _same_failure_again(self, unit: dict, proc: UnitProcess, code: int) -> bool:
        """Whether init gives up on the unit: it has failed the same way
        (the last line its process said, and its exit status)
        ``same_failure_limit`` times in a row, each within RESTART_INTERVAL
        of its start -- a VMM that dies on a damaged file or a bug at every
        start, which restarting forever would only hide.  Said in the
        unit's log and in :meth:`status` (``failed``)."""
        limit = unit.get("same_failure_limit")
        if not limit:
            return False
        name = unit["name"]
        status = f"signal {-code}" if code < 0 else f"status {code}"
        cause = f"{self.last_words(name) or 'no output'} (exit {status})"
        last, count = self.same_failures.get(name, ("", 0))
        quick = time.monotonic() - proc.started < RESTART_INTERVAL
        count = count + 1 if cause == last and quick else 1
        self.same_failures[name] = (cause, count)
        if count < limit:
            return False
        self.failed[name] = f"{cause}, {count} times in a row: not restarted"
        log.error("unit %s failed the same way %d times in a row: %s; not restarting it", name, count, cause)
        try:
            with open(self.state.logs / f"{name}.log", "a") as f:
                f.write(f"init: failed the same way {count} times in a row: {cause}; not restarting it\n")
        except OSError:
            pass  # its log cannot be written: `luvmm host status` says so
        return True

    def last_words(self, name: str) -> str:
        """The last line a unit's process said (its log's last line that is
        not a traceback's inner line, nor init's own): what it died of."""
        try:
            with open(self.state.logs / f"{name}.log", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        return next((ln.strip() for ln in reversed(lines)
                     if ln.strip() and not ln.startswith((" ", "---", "init: ", "Traceback"))), "")

    def _start_or_log(self, unit: dict, boot: str) -> None:
        try:
            self._start(unit, boot)
        except OSError as e:
            if not self.keep_going:
                raise
            log.error("unit %s cannot start: %s", unit["name"], e)

    async def start_all(self, boot: str) -> None:
        # VMMs first: after a kexec each has its interpreter to start before it
        # needs the agent, and the agent starts faster than that.
        units = self.state.read_units()
        units.sort(key=lambda unit: unit["name"] == "agent")
        for unit in units:
            if unit["name"] not in self.procs or self.procs[unit["name"]].returncode is not None:
                self._start_or_log(unit, boot)

    async def wait_ready(self, names, timeout: float) -> set[str]:
        """Wait until each unit of ``names`` said READY=1, or its process
        ended, for at most ``timeout``; returns those that did neither."""
        waiting = set(names)
        with trio.move_on_after(timeout):
            while True:
                waiting = {n for n in waiting if n not in self.ready
                           and n in self.procs and self.procs[n].returncode is None}
                if not waiting:
                    break
                changed = self.ready_changed
                with trio.move_on_after(0.05):  # a unit that exits says nothing: looked at again
                    await changed.wait()
        return waiting

    async def start_unit(self, name: str) -> dict:
        unit = next((u for u in self.state.read_units() if u["name"] == name), None)
        if unit is None:
            raise FileNotFoundError(errno.ENOENT, f"no unit {name!r}")
        proc = self.procs.get(name)
        if proc is not None and proc.returncode is None:
            return {"name": name, "pid": proc.pid, "already": True}
        return {"name": name, "pid": self._start(unit, "cold", strict=True)}

    async def _kill(self, proc: UnitProcess) -> None:
        _killpg([proc], signal.SIGKILL)
        await proc.wait()

    async def stop_unit(self, name: str) -> dict:
        proc = self.procs.pop(name, None)
        if proc is None:
            self.flush_fdstore(name)
            self.close_sockets(name)
            return {"name": name, "running": False}
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(5):
                await proc.wait()
        await self._kill(proc)
        self.kill_members(unit=name)  # KillMode=control-group: whatever left the unit's process group too
        self.flush_fdstore(name)  # stopped: its stored files go (systemd flushes the store at stop)
        self.close_sockets(name)  # and its sockets, only now: no process of it runs any more
        return {"name": name, "returncode": proc.returncode}

    async def stop_all(self) -> list[dict]:
        """Stop every unit as :meth:`stop_unit` does (SIGTERM, SIGKILL after
        5 s), all at once, then whatever escaped them: its host is going."""
        results: list[dict] = []
        self.stopping = True

        async def one(name: str) -> None:
            results.append(await self.stop_unit(name))

        async with trio.open_nursery() as nursery:
            for name in list(self.procs):
                nursery.start_soon(one, name)
        self.kill_members(before_generation=self.generation() + 1)
        for name in list(self.fdstores):
            self.flush_fdstore(name)
        self.close_sockets()
        return sorted(results, key=lambda r: r["name"])

    async def request(self, request: dict):
        """The reply's value to one of init's requests (:data:`OPS`, already
        authorized and checked against its schema): what a host's control
        socket answers for init."""
        op = request["op"]
        if op == "units":
            return self.status()
        if op == "unit-of":
            return self.unit_of(int(request["pid"]))
        if op == "unit-start":
            return await self.start_unit(check_unit_name(request["name"]))
        if op == "unit-stop":
            return await self.stop_unit(check_unit_name(request["name"]))
        raise ValueError(f"not a request of init: {op[:40]!r}")

    def members(self, *, unit: str | None = None, before_generation: int | None = None) -> list[int]:
        """Processes of this machine's units found by the environment init
        gave them (a fork keeps it, whatever its session or parent): of
        ``unit``, or of units started before ``before_generation``."""
        found = []
        mine = f"LUVMM_STATE_DIR={self.state.path}".encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            except OSError:
                continue
            if env.get(b"LUVMM_STATE_DIR") != mine.split(b"=", 1)[1] or b"LUVMM_UNIT" not in env:
                continue
            if unit is not None and env[b"LUVMM_UNIT"] != unit.encode():
                continue
            if before_generation is not None:
                try:
                    if int(env.get(b"LUVMM_GENERATION", b"0")) >= before_generation:
                        continue
                except ValueError:
                    pass
            found.append(int(entry))
        return found

    def kill_members(self, **which) -> int:
        pids = self.members(**which)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def unit_of(self, pid: int) -> str | None:
        """The unit whose process ``pid`` is (None: no unit's -- the operator's).

        Membership is what systemd's cgroups give a real host: a unit's
        process and everything it starts.  Here: the unit's main process, or
        a process of its session (units start with setsid(): a child that
        forks away keeps the session), or a descendant of either.  A process
        re-parented to init -- it forked out of its unit and changed its
        session -- is ORPHAN: some unit's, never the operator's."""
        units = {proc.pid: name for name, proc in self.procs.items() if proc.returncode is None}
        me, first = os.getpid(), pid
        for _ in range(64):
            if pid in units:
                return units[pid]
            if pid == me:
                return self._unit_by_environ(first) or ORPHAN
            if pid <= 1:
                return None
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                parent, session = int(fields[1]), int(fields[3])
            except (OSError, ValueError, IndexError):
                return None
            if session in units:
                return units[session]
            pid = parent
        return None

    def _unit_by_environ(self, pid: int) -> str | None:
        """The unit an escaped process came from, by the environment init gave that unit."""
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except OSError:
            return None
        if env.get(b"LUVMM_STATE_DIR") != self.state.path.encode():
            return None
        unit = env.get(b"LUVMM_UNIT", b"").decode(errors="replace")
        return unit if unit in self.procs else None

    async def reap_orphans(self) -> None:
        """Reap the processes re-parented to init (the subreaper's duty);
        units' own processes are reaped through their pidfds."""
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            async for _ in signals:
                self._reap_orphans()

    @staticmethod
    def _reap_orphans() -> None:
        me = os.getpid()
        try:
            tasks = os.listdir(f"/proc/{me}/task")
        except OSError:
            return
        for tid in tasks:
            try:
                with open(f"/proc/{me}/task/{tid}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except (OSError, ValueError):
                continue
            for pid in children:
                if pid in UnitProcess.live:
                    continue
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass

    def kill_unit(self, name: str, why: str) -> None:
        """SIGKILL one unit's process group now (injected faults): the unit's
        restart policy decides what follows, as for any crash."""
        proc = self.procs.get(name)
        if proc is not None and proc.returncode is None:
            log.warning("%s: killing unit %s (pid %d)", why, name, proc.pid)
            _killpg([proc], signal.SIGKILL)

    def kill_all(self, sig: int = signal.SIGKILL) -> list[UnitProcess]:
        """SIGKILL every unit's process group.  Returns the processes to reap:
        the caller need not wait for their teardown (unmapping guest RAM takes
        milliseconds) before the new kernel's units start -- a SIGKILLed
        process never runs another instruction of its own.

        With ``sig`` SIGSTOP (an emulated kexec): stopped, not killed, so that
        they tear nothing down yet -- :meth:`bury` kills them once the new
        units' guests run.  A real kexec has no such teardown: on the emulated
        host's two cores it took a core from the restoring VMMs for the
        length of its unmapping, in the blackout."""
        procs = list(self.procs.values())
        _killpg(procs, sig)
        self.procs.clear()
        for name in list(self.fdstores):  # init itself does not outlive a kexec
            self.flush_fdstore(name)
        # The units' sockets stay bound: the emulated host's kexec replaces its machine's userspace, and
        # a local user of the real machine outside it would find the ports free until the units start again.
        return procs

    async def bury(self, procs: list[UnitProcess]) -> None:
        """Kill and reap the processes :meth:`kill_all` stopped, their
        teardown last in line for a CPU and off the guests' ones (a vCPU
        thread of the old VMM was pinned to one): :func:`last_in_line`.
        (A host that stops meanwhile kills them with the rest: reap's
        ``everything``.)"""
        for proc in procs:
            if proc.returncode is None:
                last_in_line(proc.pid)
        _killpg(procs, signal.SIGKILL)
        await self.reap(procs)

    async def reap(self, procs: list[UnitProcess], *, everything: bool = False) -> None:
        """Wait for the old kernel's unit processes, then stop what escaped
        their process groups (off the blackout's path: scanning /proc takes
        milliseconds): the old kernel's, or with ``everything`` (the machine
        stops) all of them."""
        for proc in procs:
            await proc.wait()
        self.kill_members(before_generation=self.generation() + (1 if everything else 0))


    def status(self) -> list[dict]:
        out = []
        for unit in self.state.read_units():
            name = unit["name"]
            proc = self.procs.get(name)
            out.append({"name": name, "argv": unit["argv"], "pid": proc.pid if proc else None,
                        "restarts": self.restart_count.get(name, 0), "failed": self.failed.get(name),
                        "running": proc is not None and proc.poll() is None,
                        "returncode": proc.poll() if proc else None, "starts": self.starts.get(name, 0),
                        "fdstore": sorted(self.fdstores.get(name, {})),
                        "sockets": {k: v[0] for k, v in sorted(self.sockets.get(name, {}).items())}})
        return out
