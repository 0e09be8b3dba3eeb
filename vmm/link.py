"""The VMM's side of the link to its control plane.

The VM -- KVM, its vCPUs running in C (vmm/runloop.c), its RAM, its device,
its LUO sessions -- stays in the VMM process.  Its control plane (trio: the
agent channel, ``vmm.sock``, Prometheus metrics, the checks after a
restore: luvmm.vmm.control) runs beside it in a process of its own, started once
the guest runs, and asks for what it needs of the VM over a socketpair;
this module answers, in the VMM's main thread.

Why another process, and not a thread: the vCPUs share this process's
address space, and every change to it that the kernel must flush from
other CPUs' TLBs -- a shared library loaded (relocations, mprotect), memory
given back -- interrupts each CPU a vCPU runs on.  Under KVM-PVM such an
interrupt costs the guest ~50 us (`luvmm bench shootdown` measures it);
``import trio`` loads twenty extension modules, a hundred-odd shootdowns,
right after the resume.  In its own address space the control plane
interrupts the guest for none of it, and this side imports nothing the
restore path did not: what it does on a request is reads of guest RAM and
the vCPUs' counters, ioctls, and what a live update needs done here (pause,
save, resume: KVM takes vCPU ioctls from the VM's own process only).

The protocol is luvmm.rpc's (one JSON object a message, fds by
SCM_RIGHTS, the errno envelope); :data:`OPS` are the requests.  The
control plane's process is this one's child: it dies with it
(PR_SET_PDEATHSIG), and if it dies alone it is started again -- unless the
VM was paused and saved for an update it was driving: then the VMM exits
too, as a VMM that died there did before (the next kernel restores the VM
from its session, or init starts the VMM again on its files).

The metrics socket its unit was passed (luvmm.vmm.process) is handed to each
control plane this process starts, on METRICS_FD: the port stays the
unit's, bound by init, while control planes and VMMs come and go.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import time
import _signal
import _socket

from luvmm import rpc
from luvmm.wire import ProtocolError, close_fds
from luvmm.liveupdate import fdstore
from luvmm.liveupdate.luo import Session
from luvmm.liveupdate.state import StateDir, python_unit, record_imports
from luvmm.vmm import guest as layout

#: The fd the control plane finds its end of the link on.
LINK_FD = 3
#: The fd the control plane finds the unit's metrics socket on, when it was passed one.
METRICS_FD = LINK_FD + 1
#: A control plane that keeps dying is started again no faster than this.
RESPAWN_MAX_DELAY_S = 2.0
#: LUVMM_VMM_FAULT's faults are the control plane's to inject (luvmm.vmm.control); "die" is how.
OPS = ("hello", "progress", "device", "mark", "finish", "report", "open-session", "preserve", "prepare", "cancel",
       "status", "sample-exits", "die", "stop")


class _Stop(Exception):
    """SIGTERM or SIGINT while waiting for a request."""


class Link:
    """Serve the control plane of ``vm`` until it is stopped (``stop``, or a
    signal).  ``restored``: (incoming session, saved machine state) after a
    restore, until the update is reported."""

    def __init__(self, vm, host, services, state: StateDir, name: str, agent, clock, restored, boot: str,
                 host_kind: str = "emulated", metrics_fd: int | None = None):
        self.vm, self.host, self.services, self.state, self.name = vm, host, services, state, name
        self.host_kind = host_kind
        #: The unit's metrics socket (init's, passed to this process), or None: the control plane binds.
        self.metrics_fd = metrics_fd
        self.agent, self.clock, self.restored, self.boot = agent, clock, restored, boot
        #: After a restore: whether its report went to the agent, and whether its incoming session is FINISHed.
        self.reported = self.finished = False
        self.session: Session | None = None
        self.opened = False  # the outgoing session opened, the files left with init
        self.prepared = False
        self.exits = None  # luvmm.vmm.exits.ExitStats, made on the first request for it
        self.child = 0
        self.sock = None
        self.waiting = False
        self.stopping = False

    # --- the control plane's process ------------------------------------------------------------

    def spawn(self) -> None:
        """Start the control plane, its end of a new link on LINK_FD.  By
        posix_spawn (vfork): nothing of this address space is copied, and
        nothing of it changes -- no page made copy-on-write to shoot down."""
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
        args = ["--state-dir", self.state.path, "--name", self.name, "--host", self.host_kind,
                "--link-fd", str(LINK_FD), "--vmm-pid", str(os.getpid())]
        actions = [(os.POSIX_SPAWN_DUP2, theirs.fileno(), LINK_FD)]
        metrics = None
        try:
            if self.metrics_fd is not None:
                # Above LINK_FD and METRICS_FD: neither dup2 overwrites what the other is to copy.
                metrics = fcntl.fcntl(self.metrics_fd, fcntl.F_DUPFD_CLOEXEC, METRICS_FD + 1)
                actions.append((os.POSIX_SPAWN_DUP2, metrics, METRICS_FD))
                args += ["--metrics-fd", str(METRICS_FD)]
            argv, env = python_unit("luvmm.vmm.control", *args)
            self.child = os.posix_spawn(argv[0], argv, dict(os.environ, **env), file_actions=actions)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            if metrics is not None:
                os.close(metrics)
        self.sock = ours

    def _reap(self) -> int | None:
        """Wait for the control plane's process to exit (its link is closed); its status."""
        if not self.child:
            return None
        pid, self.child = self.child, 0
        try:
            return os.waitpid(pid, 0)[1]
        except ChildProcessError:
            return None

    def run(self) -> int:
        """Serve until stopped; then release the VM (its session, its
        files) and close it.  The VMM's exit status."""
        for sig in (_signal.SIGTERM, _signal.SIGINT):
            _signal.signal(sig, self._on_signal)
        delay = 0.1
        try:
            while not self.stopping:
                started = time.monotonic()
                self.spawn()
                self._serve()
                if self.stopping:
                    break
                self.sock.close()
                self.sock = None
                status = self._reap()
                if self.prepared:
                    # Paused and saved for an update the control plane was
                    # driving: the VM must not run on from here (the kexec
                    # may still restore it from what was saved).  The VMM
                    # goes as if it had died there -- what init and the
                    # agent already handle: the next kernel restores the VM
                    # from its session, or init starts the VMM again on its
                    # files (Vm.recover).
                    print(f"vmm[{self.name}]: its control plane exited (status {status}) with the VM prepared "
                          "for an update: exiting", file=sys.stderr)
                    sys.stderr.flush()
                    os._exit(1)
                print(f"vmm[{self.name}]: its control plane exited (status {status}): starting it again",
                      file=sys.stderr)
                delay = 0.1 if time.monotonic() - started > 10 else min(2 * delay, RESPAWN_MAX_DELAY_S)
                time.sleep(delay)  # a control plane that dies at once is not started in a busy loop
        except _Stop:
            pass
        finally:
            if self.sock is not None:
                self.sock.close()  # the control plane sees its link close, and exits
            if self.child:
                try:
                    os.kill(self.child, _signal.SIGTERM)
                except ProcessLookupError:
                    pass
                self._reap()
        record_imports("vmm-stopped")
        self.agent.retry = False  # going away: no waiting for an agent that is gone
        try:
            self.agent.release(self.name)  # stopped: the VM is going away, its session and files with it
        except OSError:
            pass
        self.vm.close()
        return 0

    def _on_signal(self, signum, frame) -> None:
        self.stopping = True
        if self.waiting:
            raise _Stop()  # out of the wait for the next request; never out of one being served

    def _serve(self) -> None:
        """Answer the control plane until its link closes or ``stop``."""
        while not self.stopping:
            self.waiting = True
            try:
                if self.stopping:
                    return
                try:
                    request, fds = rpc.recv(self.sock)
                except ProtocolError as e:
                    rpc.send(self.sock, rpc.error_reply(e))
                    continue
            except OSError:
                return
            finally:
                self.waiting = False
            if request is None:
                return
            out: list[int] = []
            try:
                close_fds(fds)
                op = request.get("op")
                if op not in OPS:
                    raise OSError(errno.EINVAL, f"unknown request {str(op)[:40]!r}")
                ok, out = getattr(self, "op_" + op.replace("-", "_"))(request)
                reply = {"ok": ok}
            except Exception as e:  # noqa: BLE001 -- every request gets its reply
                reply = rpc.error_reply(e)
                if not isinstance(e, OSError):
                    print(f"vmm[{self.name}]: {request.get('op')!r} failed: {e!r}", file=sys.stderr)
            try:
                rpc.send(self.sock, reply, out)
            except OSError:
                return
            finally:
                close_fds(out)

    # --- the requests -----------------------------------------------------------------------------

    def op_hello(self, request) -> tuple[dict, list[int]]:
        """Who the VM is, and its RAM (to read its mailbox from: a scrape, a
        status, the checks after a restore read guest RAM, not this process)."""
        vm = self.vm
        hello = {"name": self.name, "pid": os.getpid(), "boot": self.boot, "config": vm.config.to_dict(),
                 "bdf": vm.bdf, "restored": self.restored is not None and not self.reported,
                 "finish_pending": self.restored is not None and not self.finished, "first_run": vm.first_run,
                 "marks": self.clock.marks}
        return hello, [os.dup(vm.memory.memfd)]

    def op_progress(self, request) -> tuple[dict, list[int]]:
        """After a restore: has the guest moved on from the pause (heartbeat
        and DMA), and are the transfers in flight then all completed?"""
        saved = self._saved()
        at_pause, inflight = saved.timestamps.mailbox_at_pause, saved.timestamps.inflight_at_pause
        now = self.vm.mailbox.snapshot()
        moved = now["heartbeat"] > at_pause["heartbeat"]
        drained = self.vm.still_in_flight(inflight) == 0
        return {"done": bool(moved and drained and now["completed"] > at_pause["completed"] or self.vm.crash),
                "mailbox": now}, []

    def op_device(self, request) -> tuple[dict, list[int]]:
        vm = self.vm
        return {"enabled": vm.device_enabled(), "was_reset": bool(vm.device.was_reset),
                "bus_master_restored": bool(vm.bus_master_restored)}, []

    def op_mark(self, request) -> tuple[float, list[int]]:
        return self.clock.mark(str(request["name"])), []

    def op_finish(self, request) -> tuple[bool, list[int]]:
        """FINISH the incoming session (OSError: the kernel refused; it stays)."""
        self._saved()
        if not self.finished:
            self.restored[0].finish()
            self.finished = True
            fdstore.remove(fdstore.INCOMING)  # nothing left in it: init need not keep it
        return True, []

    def op_report(self, request) -> tuple[dict, list[int]]:
        """The update's report (luvmm.vmm.report), sent to the agent; asked once
        the horizon the guest's outage is measured over has passed."""
        from luvmm.vmm.report import update_report

        report = update_report(self.vm, self.services, self.clock.marks, self._saved(), request["after"])
        report["finish_error"] = request.get("finish_error")
        # Why its metrics are not served (it had to bind the port itself, and could not): `luvmm update` says so.
        report["metrics_error"] = request.get("metrics_error")
        # Where the VMM was in the guest's path since the resume: its vCPUs'
        # exits, KVM's and the run loop's counts (vm status shows them live).
        report["exits"] = self._exits().counts() or None
        self.agent.restored(self.name, report)
        self.reported = True
        return report, []

    def op_open_session(self, request) -> tuple[dict, list[int]]:
        """The outgoing session, for the next update (a cold-booted VM: a new
        one -- one an earlier VMM of this name left describes a VM that is
        gone), the VM's files preserved in it and left in the fd store.  A
        control plane started again finds the one its predecessor opened."""
        error = None
        if self.session is None:
            session_fd, created = self.agent.create_session(self.name, fresh=self.boot == "cold")
            self.session = Session(self.host, session_fd, self.name)
            if created:
                self.vm.preserved = set()  # a new session holds none of the files an earlier one did
        try:
            self.vm.preserve(self.session)
        except OSError as e:  # the VM runs on; prepare tries again, and refuses the update if it fails
            error = f"PRESERVE_FD failed: {e.strerror or e}"
        if not self.opened:
            self.opened = True
            self.vm.leave_files()
            if self.services.observer is not None:  # an observer on the machine's bus (emulated hosts have one)
                self.services.observer.watch(self.vm.bdf, layout.offset("heartbeat"))
        return {"preserve_error": error}, []

    def op_preserve(self, request) -> tuple[bool, list[int]]:
        self.vm.preserve(self._session())
        return True, []

    def op_prepare(self, request) -> tuple[dict, list[int]]:
        """Pause and save for an update; if that fails the VM resumes."""
        if self.prepared:
            raise OSError(errno.EBUSY, f"{self.name}: already prepared")
        session = self._session()
        try:
            phases = self.vm.prepare(session)
        except OSError:
            self.vm.cancel()
            raise
        self.prepared = True
        return {"phases": phases}, []

    def op_cancel(self, request) -> tuple[bool, list[int]]:
        """Rollback: resume the VM prepared for an update that will not happen."""
        was = self.prepared
        if was:
            self.prepared = False
            self.vm.cancel()
        return was, []

    def op_status(self, request) -> tuple[dict, list[int]]:
        vm = self.vm
        return {"pid": os.getpid(), "boot": self.boot, "config": vm.config.to_dict(), "bdf": vm.bdf,
                "crash": vm.crash and vars(vm.crash), "interrupts": vm.count_interrupts(),
                "portal_writes": vm.portal_writes, "prepared": self.prepared,
                "exits": self._exits().status(), "guest_path": vm.device.guest_path()}, []

    def op_sample_exits(self, request) -> tuple[bool, list[int]]:
        self._exits().sample()
        return True, []

    def op_die(self, request) -> tuple[None, list[int]]:
        """Fault injection (tests): the VMM exits at once, its vCPUs paused first if asked."""
        if request.get("pause"):
            self.vm.pause()
        sys.stderr.flush()
        os._exit(137)

    def op_stop(self, request) -> tuple[bool, list[int]]:
        self.stopping = True  # the VM goes once the reply is sent (run)
        return True, []

    # --- helpers ----------------------------------------------------------------------------------

    def _saved(self):
        if self.restored is None:
            raise OSError(errno.ENOENT, f"{self.name}: no restore waiting to be reported")
        return self.restored[1]

    def _session(self) -> Session:
        if self.session is None:
            raise OSError(errno.ENOENT, f"{self.name}: no outgoing session yet")
        return self.session

    def _exits(self):
        if self.exits is None:
            from luvmm.vmm.exits import ExitStats

            self.exits = ExitStats(self.vm)
        return self.exits
