"""`luvmm boot`: luvmm's own init (luvmm.liveupdate.init) over the real kernel, on
a real host without systemd -- the lab's QEMU guest, where virtme-ng's init
runs one command per boot; an rc script or an inittab line elsewhere.  It
does what luvmm's systemd units do (luvmm/wiring/systemd.py): start the
agent and every VM's VMM of the state dir, restart them when they fail,
keep their fd stores, and tell them how they started.

**How they started.**  systemd tells nothing of the kind (luvmm.liveupdate.state.unit_boot
guesses from /run); this init knows: the first `luvmm boot` since the
kernel booted -- the kernel's ``boot_id`` differs from the one recorded in
the state dir (``boot.id``) -- starts its units with ``LUVMM_BOOT=kexec``,
which is always safe on a fresh boot: a VMM finds no incoming session after
a cold boot and boots its VM cold, and the agent resumes only an update its
record says was in its kexec.  A `luvmm boot` again in the same boot (it
was stopped, or died) starts them ``cold``: whatever the kexec handed over
was taken by the first.  The new boot_id is recorded only once the units
have started: an init that failed to start leaves the next one a kexec boot.

**The units' sockets** (a VM's metrics port: luvmm.liveupdate.init) are bound
by this init when it starts their units -- after a kexec the new kernel's
init binds them before its units run, so the port is a unit's from its
first process on -- and closed when it stops.  One that cannot be bound
then does not keep its VM down: the unit starts without it, and its VMM
binds the port itself (or says, in its update's report, why it cannot).

**Its socket** ``init.sock`` (0600, in the 0700 state dir) answers
``hello`` and init's requests (luvmm.liveupdate.init.OPS, authorized as on the
emulated host: luvmm.liveupdate.init.authorize); units find it in
``LUVMM_INIT_SOCKET`` (luvmm.wiring.connect: their Units).

**One per state dir**: ``boot.pid`` holds the pid of the running init and
an exclusive flock(2) of it for as long as that init lives -- a lock the
kernel lets go when the process dies however it dies, so a pidfile left by
an init that was killed, or by the kernel before a kexec, is never taken
for a running one.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal

from luvmm.liveupdate.init import Init, authorize, OPS
from luvmm.liveupdate.state import StateDir, lock_file, python_unit, RESTART_MAX_DELAY_S

log = logging.getLogger("luvmm.boot")

#: The kernel's id of its boot: a new one at every boot, kexec or cold (random(4)).
BOOT_ID = "/proc/sys/kernel/random/boot_id"
PIDFILE, LOG, RECORD = "boot.pid", "boot.log", "boot.id"
#: Each unit's LUVMM_GENERATION: one kernel for the whole life of this init.
GENERATION = 1
MAX_CONNECTIONS_PER_PEER = 64
MAX_CONNECTIONS = 256


class BootError(RuntimeError):
    """luvmm's init cannot start here (one line: why)."""


class AlreadyRunning(BootError):
    def __init__(self, state: StateDir, pid: int | None):
        super().__init__(f"luvmm's init already runs in {state.path}{f' (pid {pid})' if pid else ''}; "
                         f"`luvmm boot --stop --state-dir {state.path}` stops it")
        self.pid = pid


# --- how the units start ----------------------------------------------------------------------


def read_boot_id(path: str = BOOT_ID) -> str:
    with open(path) as f:
        return f.read().strip()


def boot_kind(state: StateDir, boot_id: str) -> str:
    """``kexec`` if no init started here since the kernel booted
    (``boot_id``), else ``cold``."""
    try:
        recorded = state.read_file(RECORD).decode(errors="replace").strip()
    except OSError:
        recorded = None
    return "cold" if recorded == boot_id else "kexec"


def record_boot(state: StateDir, boot_id: str) -> None:
    """This boot has had its init: a `luvmm boot` again in it starts its units cold."""
    state.write_file(RECORD, f"{boot_id}\n".encode(), mode=0o644)


def agent_unit(state: StateDir) -> bool:
    """Write the agent's unit if there is none (one the operator wrote
    stays): the real host's agent, restarted whenever it fails, never given
    up on, as the emulated host's and systemd's.  True if written."""
    if any(u["name"] == "agent" for u in state.read_units()):
        return False
    state.write_unit("agent", *python_unit("luvmm.wiring.agent", "--state-dir", state.path, "--host", "real"),
                     restart="on-failure", pdeathsig="self", start_limit_burst=0,
                     restart_max_delay_sec=RESTART_MAX_DELAY_S)
    return True


# --- one init per state dir -------------------------------------------------------------------


def pidfile(state: StateDir) -> str:
    return state.runtime_path(PIDFILE)  # a pid is a thing of one boot, as a socket is


def running(state: StateDir) -> int | None:
    """The pid of the init running in ``state`` (its pidfile is locked), else None.  Changes nothing."""
    try:
        fd = os.open(pidfile(state), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return int(os.pread(fd, 32, 0)) or None
            except ValueError:
                return -1  # locked, its pid not written yet: running all the same
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def lock(state: StateDir) -> int:
    """Take ``boot.pid`` for this process: its fd, locked, with this pid in
    it; AlreadyRunning if another init holds it."""
    fd = lock_file(pidfile(state), 0o644)  # the one at the path, not one an init that just exited unlinked
    if fd is None:
        raise AlreadyRunning(state, running(state))
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def unlock(state: StateDir, fd: int) -> None:
    """Remove the pidfile, then let the lock go (in that order: the next init locks a new file)."""
    try:
        os.unlink(pidfile(state))
    except FileNotFoundError:
        pass
    os.close(fd)


def clean(state: StateDir) -> list[str]:
    """Remove what an init that is not running left (its sockets, its
    pidfile); the units, logs and the boot record stay.  Returns what went."""
    if running(state) is not None:
        raise AlreadyRunning(state, running(state))
    gone = []
    for name in ("init.sock", "notify.sock", PIDFILE):  # in the runtime dir (the state dir when there is none)
        try:
            os.unlink(os.path.join(state.runtime, name))
            gone.append(name)
        except (FileNotFoundError, NotADirectoryError):
            pass
    return gone


# --- the init -------------------------------------------------------------------------------


class BootInit:
    """luvmm's init with its sockets, over the real kernel.  ``boot``: how
    its units start (:func:`boot_kind`).  :meth:`run` reports it started
    (``{pid, boot, units}``) once its socket listens and every unit is
    spawned; a unit that cannot be spawned is logged and left stopped, not
    the end of the host's other units (``keep_going``)."""

    def __init__(self, state: StateDir, boot: str):
        self.state = state
        self.boot = boot
        self.init = Init(state, generation=lambda: GENERATION, unit_env={"LUVMM_INIT_SOCKET": state.init_socket},
                         keep_going=True)
        self.units: list[str] = []
        import trio

        self._stop = trio.Event()
        self.finished = trio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self, *, task_status=None) -> None:
        import trio

        from luvmm import rpc
        from luvmm.wire import listen_seqpacket

        listener = trio.socket.from_stdlib_socket(listen_seqpacket(self.state.runtime_path("init.sock")))
        try:
            async with trio.open_nursery() as nursery:
                self.init.nursery = nursery
                self.init.listen_notify()
                nursery.start_soon(self.init.serve_notify)
                nursery.start_soon(self.init.reap_orphans)
                nursery.start_soon(rpc.Listener(per_peer=MAX_CONNECTIONS_PER_PEER, total=MAX_CONNECTIONS,
                                                who="luvmm's init").run, listener, self._control, nursery)
                await self.init.start_all(self.boot)
                self.units = sorted(self.init.procs)
                if task_status is not None:
                    task_status.started({"pid": os.getpid(), "boot": self.boot, "units": self.units})
                await self._stop.wait()
                log.info("stopping: %s", ", ".join(self.init.procs) or "no unit runs")
                await self.init.stop_all()
                nursery.cancel_scope.cancel()
        finally:
            listener.close()
            self.init.close_sockets()
            if self.init.notify_sock is not None:
                self.init.notify_sock.close()
            for path in (self.state.init_socket, self.init.notify_path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            self.finished.set()

    async def _control(self, conn) -> None:
        from luvmm import rpc, schema
        from luvmm.peer import identify
        from luvmm.wire import close_fds

        peer = []  # looked up at the first request that needs it (luvmm.peer: fixed at connect)

        async def handle(request: dict, fds: list[int]):
            close_fds(fds)  # init takes no files over its socket
            op = request["op"]
            if op == "hello":
                return {"pid": os.getpid(), "boot": self.boot, "state_dir": self.state.path,
                        "units": self.units}, []
            if not peer:
                try:
                    peer.append(identify(conn, self.init.unit_of))
                except PermissionError as e:
                    peer.append(None)
                    log.warning("%s", e.strerror)
            if peer[0] is None:
                raise PermissionError(errno.EPERM, f"{op}: refused to a peer that cannot be identified")
            if op not in OPS:
                raise ValueError(f"unknown request {op[:40]!r}")
            if not authorize(op, peer[0]):
                raise PermissionError(errno.EPERM, f"{op}: refused to a process of unit {peer[0].unit} "
                                                   "(it is the operator's)")
            return await self.init.request(request), []

        with conn:
            await rpc.serve_connection(conn, handle, schema=schema.INIT, log=log)


def serve(state: StateDir, *, ready, boot_id_path: str = BOOT_ID) -> int:
    """Run luvmm's init in this process until SIGTERM or SIGINT, then stop
    its units and remove its sockets and pidfile.  ``ready(line)`` is called
    once: ``"ready PID BOOT UNIT,UNIT..."`` when it serves, or ``"error
    WHY"`` if it cannot start -- then only once its files are gone, so that
    whoever started it may clean up after it at once.  Returns the exit
    status."""
    try:
        fd = lock(state)
    except BootError as e:
        ready(f"error {e}")
        return 1
    except OSError as e:
        ready(f"error cannot take {pidfile(state)}: {e.strerror or e}")
        return 1
    failed = []
    try:
        try:
            boot_id = read_boot_id(boot_id_path)
        except OSError as e:
            failed.append(f"cannot read the kernel's boot id ({boot_id_path}): {e.strerror or e}")
        else:
            _run(state, BootInit(state, boot_kind(state, boot_id)), boot_id, ready, failed)
    finally:
        unlock(state, fd)
    if failed:
        ready(f"error {failed[0]}")
        return 1
    return 0


def _run(state: StateDir, boot: BootInit, boot_id: str, ready, failed: list[str]) -> None:
    import trio

    async def main():
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                async def on_signal():
                    async for signum in signals:
                        log.info("%s: stopping", signal.Signals(signum).name)
                        boot.stop()
                nursery.start_soon(on_signal)
                info = await nursery.start(boot.run)
                try:
                    record_boot(state, boot_id)
                except OSError as e:  # the units run; the next `luvmm boot` in this boot is a kexec one too
                    log.error("cannot record this boot in %s: %s", state.path, e.strerror or e)
                log.info("luvmm's init up (%s boot, pid %d): started %s", info["boot"], info["pid"],
                         ", ".join(info["units"]) or "no unit")
                ready(f"ready {info['pid']} {info['boot']} {','.join(info['units'])}")
                await boot.finished.wait()
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except OSError as e:  # before it served: its socket could not be made, a unit not spawned
        log.error("cannot start: %s", e)
        failed.append(f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}")
