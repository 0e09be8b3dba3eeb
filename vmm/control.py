"""The VMM's control plane (trio), in a process of its own beside the VM's.

The VMM process (luvmm.vmm.process) holds the VM and, once its guest runs,
starts this one over a socketpair (luvmm.vmm.link: why it is another process --
the guest's CPUs are not interrupted for anything this one loads or
frees).  Here:

* After a restore: verify the guest (its heartbeat and DMA counters move on
  from where they were, the batches in flight at the pause complete), FINISH
  the incoming session, and have the update's report sent to the agent.
* The agent channel: ``prepare`` pauses the VM, saves and preserves it;
  ``cancel`` resumes it (rollback).  A failed prepare rolls back by itself.
* ``vms/NAME/vmm.sock``: ``status`` and ``stop`` for `luvmm vm`.
* Metrics: every update's figures go into ``vms/NAME/metrics.json`` (they
  outlive this process, as counters must), served to Prometheus over HTTP
  when the VM's config has a metrics address -- on the unit's socket, which
  init holds and the VMM hands over (``--metrics-fd``): the port is never
  free between two control planes, two VMMs or two kernels, for a local
  user to take.  Only without one (a VMM run by hand) is the port bound
  here, and if that fails the VM runs on without it: ``vm status`` says
  why, and so does the report of the update that restored it (`luvmm
  update` fails on it).

What it needs of the VM it asks the VMM (:class:`VmLink`); the guest's
mailbox it reads itself, from a read-only mapping of the RAM memfd the VMM
hands over.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import signal
import socket
import sys

import trio

from luvmm.metrics.vmm import UpdateStats
from luvmm import rpc, schema
from luvmm.wire import ProtocolError, close_fds, listen_seqpacket
from luvmm.liveupdate.state import StateDir
from luvmm.vmm import guest
from luvmm.vmm.config import VmConfig

log = logging.getLogger("luvmm.vmm")
VERIFY_TIMEOUT = 15.0
#: LUVMM_VMM_FAULT (tests), in the VMM that init started cold (not in the one it restarts):
#: die-after-prepare  the VMM exits right after answering ready;
#: die-in-prepare     the VMM exits with its vCPUs paused, before the machine state is saved;
#: refuse-prepare     the VMM answers prepare with an error (EIO), its guest running on.
FAULT = os.environ.get("LUVMM_VMM_FAULT") if os.environ.get("LUVMM_BOOT", "cold") == "cold" else None


class VmGone(ConnectionResetError):
    """The VMM closed the link: it is stopping, or gone -- and so is its control plane."""

    def __init__(self):
        super().__init__(errno.ECONNRESET, "the VMM is gone")


class VmLink:
    """The control plane's end of the link (luvmm.vmm.link): one request at a
    time, answered in the VMM's main thread."""

    def __init__(self, sock):
        self.sock = sock
        self.lock = trio.Lock()

    async def call_fds(self, op: str, **args) -> tuple[object, list[int]]:
        """The reply's value and the fds that came with it; OSError with its errno."""
        async with self.lock:
            if not await rpc.trio_send(self.sock, {"op": op, **args}):
                raise VmGone()
            try:
                reply, fds = await rpc.trio_recv(self.sock)
            except (OSError, ProtocolError):
                reply, fds = None, []
        if reply is None:
            raise VmGone()
        if "errno" in reply:
            close_fds(fds)
            err = reply["errno"] if isinstance(reply["errno"], int) else errno.EIO
            raise OSError(err, str(reply.get("error") or os.strerror(err)))
        return reply.get("ok"), fds

    async def call(self, op: str, **args):
        ok, fds = await self.call_fds(op, **args)
        close_fds(fds)
        return ok


class Mailbox:
    """The guest's mailbox, from a read-only mapping of its RAM's first pages
    (the memfd the VMM handed over): reading it takes nothing of the VMM."""

    def __init__(self, memfd: int):
        try:
            self.map = mmap.mmap(memfd, guest.MAILBOX_GPA + mmap.PAGESIZE, flags=mmap.MAP_SHARED,
                                 prot=mmap.PROT_READ)
        finally:
            os.close(memfd)
        self.fields = guest.Mailbox(memoryview(self.map))

    def snapshot(self) -> dict[str, int]:
        return self.fields.snapshot()


class Control:
    def __init__(self, link: VmLink, hello: dict, mailbox: Mailbox, state: StateDir, name: str,
                 metrics_sock: socket.socket | None = None):
        self.link, self.state, self.name = link, state, name
        #: The unit's metrics socket, listening (init bound it), or None: bind the config's address.
        self.metrics_sock = metrics_sock
        self.hello = hello
        self.config = VmConfig.from_dict(hello["config"])
        self.mailbox = mailbox
        self.updates = 0
        self.last_report: dict | None = None
        self.done = trio.Event()
        self.stop_vm = False  # `stop` asked (vmm.sock): the VMM goes too, not only this process
        self.metrics_path = str(state.vm_dir(name) / "metrics.json")
        self.stats = self._load_stats()
        self.metrics_port: int | None = None
        self.metrics_error: str | None = None
        self.ready = False  # registered with the agent, files stored, metrics served
        self.prepared = False  # paused and saved for an update that has not happened (yet)
        #: Why the VM's files are not all in its session yet (PRESERVE_FD failed); retried at prepare.
        self.preserve_error: str | None = None
        #: Why the incoming session is not finished yet (FINISH failed); retried until it is.
        self.finish_error: str | None = None

    # --- metrics -------------------------------------------------------------------------------

    def _load_stats(self) -> UpdateStats:
        try:
            return UpdateStats.load(self.metrics_path)
        except ValueError as e:
            # Kept for a post-mortem; the counters start again (Prometheus sees a reset).
            log.error("%s; kept as %s.damaged, counting from zero", e, self.metrics_path)
            os.replace(self.metrics_path, self.metrics_path + ".damaged")
            return UpdateStats()

    def _save_stats(self) -> None:
        try:
            self.stats.save(self.metrics_path)
        except OSError as e:
            log.error("cannot save the metrics: %s", e)

    async def metrics_listeners(self) -> list | None:
        """Where to serve the metrics: the unit's socket (nothing is bound
        here), else the config's address bound now -- before an update's
        report is sent, so that it says when that failed (``metrics_error``:
        the VM runs on without its endpoint).  None: no metrics, or none
        can be served."""
        if self.metrics_sock is None and self.config.metrics is None:
            return None
        from luvmm.metrics import http

        try:
            return await http.open_listeners(self.config.metrics, sock=self.metrics_sock)
        except (OSError, ValueError) as e:
            what = "the metrics socket passed by init" if self.metrics_sock is not None else self.config.metrics
            self.metrics_error = f"cannot serve metrics on {what}: {e.strerror if isinstance(e, OSError) else e}"
            log.error("%s", self.metrics_error)
            return None

    async def serve_metrics(self, listeners, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from luvmm.metrics import http
        from luvmm.metrics.core import registry_for
        from luvmm.metrics.vmm import VmmCollector

        registry = registry_for(VmmCollector(self.name, self.stats, self.mailbox.snapshot, self.config.memory))
        await http.serve(registry, listeners=listeners, task_status=task_status)

    # --- after a restore ------------------------------------------------------------------

    async def verify(self) -> tuple[dict | None, bool]:
        device = await self.link.call("device")
        if not device["enabled"]:
            log.warning("the device was reset during the update: its DMA stopped"
                        + (" until its driver started it again" if device["was_reset"] else ""))
        # A device opened again after the kexec (the kernel did not preserve
        # it) is started again by the guest's driver: wait for its DMA too.
        with trio.move_on_after(VERIFY_TIMEOUT if device["enabled"] or device["was_reset"] else 0.2):
            while not (await self.link.call("progress"))["done"]:
                await trio.sleep(0.002)  # polling guest RAM: nothing tells us when the guest moved on
        await self.link.call("mark", name="verified")
        after = self.mailbox.snapshot()
        if device["bus_master_restored"]:
            log.warning("the device came back with Bus Master Enable clear: set again, its DMA went on")
        finished = await self._finish()
        await self.link.call("mark", name="finished")
        # The guest's outage is measured over a horizon after the resume
        # (luvmm.vmm.pace): the report waits for it to pass, and for the observer's
        # last samples of it.  The guest runs meanwhile -- its vCPUs do not
        # need either process's attention -- and the next update waits for it.
        import time

        from luvmm.vmm.pace import LOST_HORIZON_S
        from luvmm.vmm.report import OBSERVER_LAG_S

        resumed = self.hello["first_run"] or self.hello["marks"]["resumed"]
        await trio.sleep(max(0.0, resumed + LOST_HORIZON_S + OBSERVER_LAG_S - time.time()))
        try:
            report = await self.link.call("report", after=after, finish_error=self.finish_error,
                                          metrics_error=self.metrics_error)
        except VmGone:
            raise
        except OSError as e:
            log.error("cannot report the update: %s", e.strerror or e)
            return None, finished
        self.last_report = report
        self.stats.record(report)
        self._save_stats()
        lost = report.get("guest_lost_s")
        log.info("restored: blackout %.1f ms, guest lost %s, %s DMA completions during it",
                 report["blackout_s"] * 1000, "not measured" if lost is None else f"{lost * 1000:.1f} ms",
                 report["dma_completed_during_blackout"])
        return report, finished

    async def _finish(self) -> bool:
        """FINISH the incoming session.  If the kernel refuses, the VM runs on
        and the session stays (LUO keeps its files): :meth:`finish_later`
        tries again."""
        try:
            await self.link.call("finish")
        except VmGone:
            raise
        except OSError as e:
            self.finish_error = f"FINISH failed: {e.strerror or e}"
            log.error("%s; the incoming session stays, retrying", self.finish_error)
            return False
        self.finish_error = None
        return True

    async def finish_later(self, interval: float = 0.2) -> None:
        while not await self._finish():
            await trio.sleep(interval)  # a retry, not a wait for something: nothing tells us when it may work
        log.info("incoming session finished")

    # --- the agent channel -------------------------------------------------------------------

    async def agent_channel(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Registered with the agent, serve its requests; when the agent goes
        away (it died, or gave up waiting for us), an update it had us prepare
        for cannot happen: resume the VM (rollback), and register with the
        agent that init starts next."""
        started = False
        while True:
            sock = await self._register()
            if not started:
                task_status.started()
                started = True
            with sock:
                await self._serve_agent(sock)
            if self.prepared:
                log.warning("the agent went away with the VM prepared for an update: resuming it")
                await self._cancel()
            else:
                log.warning("the agent went away")

    async def _register(self):
        while True:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            retry = 0.05  # init is starting the agent again: try its socket anew
            try:
                await sock.connect(self.state.agent_socket)
                await rpc.trio_send(sock, {"op": "register", "name": self.name})
                reply, fds = await rpc.trio_recv(sock)
                close_fds(fds)
                if reply is not None and "ok" in reply:
                    return sock
                if reply is not None:
                    log.error("the agent refused the registration: %s", reply.get("error"))
                    retry = 1.0  # it may be an agent that is not ours to speak to yet; not a busy loop
            except (OSError, ProtocolError):
                pass
            sock.close()
            await trio.sleep(retry)

    async def _serve_agent(self, sock) -> None:
        while True:
            try:
                request, fds = await rpc.trio_recv(sock)
            except ProtocolError as e:
                log.error("the agent sent a malformed message: %s", e)
                request, fds = {"op": None}, []
            except OSError:
                request, fds = None, []
            if request is None:
                return
            close_fds(fds)
            reply = await self._handle(request)
            die = request.get("op") == "prepare" and "ok" in reply and FAULT == "die-after-prepare"
            if not await rpc.trio_send(sock, reply):
                return
            if die:  # said first: the kexec may kill us as soon as the agent has the reply
                log.warning("fault injection: the VMM exits after preparing")
                logging.shutdown()
                await self.link.call("die")  # fault injection: the VMM dies between "ready" and the kexec

    async def _handle(self, request: dict) -> dict:
        try:
            schema.check(schema.CHANNEL, request)
        except ValueError as e:
            return {"errno": errno.EINVAL, "error": str(e)}
        op = request.get("op")
        try:
            return await self._channel_request(op)
        except VmGone:
            raise
        except OSError as e:
            return {"errno": e.errno or errno.EIO, "error": e.strerror or str(e)}

    async def _channel_request(self, op) -> dict:
        if op == "ready":
            # An update is coming: make sure the files are in the session,
            # the guest running on; refusing now pauses nothing anywhere.
            if self.prepared:
                return {"errno": errno.EBUSY, "error": f"{self.name}: already prepared"}
            try:
                await self.link.call("preserve")
            except VmGone:
                raise
            except OSError as e:
                self.preserve_error = f"PRESERVE_FD failed: {e.strerror or e}"
                return {"errno": e.errno or errno.EIO, "error": self.preserve_error}
            self.preserve_error = None
            return {"ok": True}
        if op == "prepare":
            if FAULT == "die-in-prepare":
                log.warning("fault injection: the VMM exits with its vCPUs paused, in prepare")
                logging.shutdown()
                await self.link.call("die", pause=True)
            if self.prepared:
                return {"errno": errno.EBUSY, "error": f"{self.name}: already prepared"}
            if FAULT == "refuse-prepare":
                log.warning("fault injection: the VMM refuses to prepare")
                return {"errno": errno.EIO, "error": "prepare refused (fault injection)"}
            try:
                done = await self.link.call("prepare")
            except VmGone:
                raise
            except OSError as e:  # the VMM resumed the VM
                log.error("prepare failed: %s; resumed", e.strerror or e)
                self._rolled_back()
                return {"errno": e.errno or errno.EIO, "error": f"{self.name}: prepare failed: {e.strerror or e}"}
            self.preserve_error = None
            self.prepared = True
            self.updates += 1
            return {"ok": {"phases": done["phases"]}}
        if op == "cancel":
            if self.prepared:
                await self._cancel()
            return {"ok": True}
        return {"errno": errno.EINVAL, "error": f"unknown request {op!r}"}

    async def _cancel(self) -> None:
        self.prepared = False
        await self.link.call("cancel")
        self._rolled_back()

    def _rolled_back(self) -> None:
        self.stats.record_rollback()
        self._save_stats()

    # --- vmm.sock ----------------------------------------------------------------------------------

    async def status(self) -> dict:
        vm = await self.link.call("status")
        mb = self.mailbox.snapshot()
        return {"name": self.name, "pid": vm["pid"], "control_pid": os.getpid(), "boot": vm["boot"],
                "config": vm["config"], "bdf": vm["bdf"],
                "guest_state": "paused" if self.prepared else guest.GUEST_STATE.get(mb["state"], str(mb["state"])),
                "mailbox": mb, "crash": vm["crash"], "interrupts": vm["interrupts"],
                "portal_writes": vm["portal_writes"], "updates_prepared": self.updates,
                "ready": self.ready, "prepared": self.prepared, "metrics_port": self.metrics_port,
                "metrics_error": self.metrics_error, "preserve_error": self.preserve_error,
                "finish_error": self.finish_error, "last_update": self.last_report, "exits": vm["exits"],
                "guest_path": vm["guest_path"]}

    async def sample_exits(self) -> None:
        """The exit counts every second: `vm status` shows their rates over the last one."""
        while True:
            await self.link.call("sample-exits")
            await trio.sleep(1.0)  # the rate's interval, not a wait for anything

    async def serve_local(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.state.make_dir("vms")
        self.state.make_dir(f"vms/{self.name}")
        # StateDir.vmm_socket's path, its directory made where it is not the state dir.
        path = self.state.runtime_path("vms", self.name, "vmm.sock")
        listener = trio.socket.from_stdlib_socket(listen_seqpacket(path))
        task_status.started()
        async with trio.open_nursery() as nursery:
            await rpc.Listener(per_peer=16, total=64, who=f"the VMM of {self.name}").run(
                listener, self._local_client, nursery)

    async def _local_client(self, conn) -> None:
        with conn:
            await rpc.serve_connection(conn, self._local_request, schema=schema.VMM, log=log)

    async def _local_request(self, request: dict, fds: list[int]):
        close_fds(fds)
        if request["op"] == "status":
            return await self.status(), []
        if request["op"] == "stop":
            self.stop_vm = True
            self.done.set()
            return True, []
        raise OSError(errno.EINVAL, f"unknown request {request['op'][:40]!r}")

    # --- the whole ----------------------------------------------------------------------------------

    async def run(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.serve_local)
                listeners = await self.metrics_listeners()  # before a restore's report: it says if this failed
                if self.hello["restored"]:
                    _, finished = await self.verify()
                    if not finished:
                        nursery.start_soon(self.finish_later)
                elif self.hello["finish_pending"]:  # a control plane before this one was still retrying
                    nursery.start_soon(self.finish_later)
                opened = await self.link.call("open-session")
                self.preserve_error = opened["preserve_error"]
                if self.preserve_error:  # the VM runs on; prepare tries again, and refuses the update if it fails
                    log.error("%s; an update will try again", self.preserve_error)
                await nursery.start(self.agent_channel)
                if listeners is not None:
                    self.metrics_port = await nursery.start(self.serve_metrics, listeners)
                self.ready = True

                nursery.start_soon(self.sample_exits)

                async def on_signal():
                    async for _ in signals:
                        self.done.set()
                nursery.start_soon(on_signal)
                await self.done.wait()
                nursery.cancel_scope.cancel()
        if self.stop_vm:
            await self.link.call("stop")


USAGE = ("usage: python -m luvmm.vmm.control --state-dir DIR --name NAME [--host emulated|real] --link-fd FD --vmm-pid PID "
         "[--metrics-fd FD]")


def main(argv: list[str] | None = None) -> int:
    """The control plane's process, started by its VMM (luvmm.vmm.link.Link.spawn)."""
    from luvmm.abi import libc
    from luvmm.liveupdate.state import PR_SET_PDEATHSIG, SIGKILL

    args = dict(zip(argv[::2], argv[1::2])) if argv is not None else dict(zip(sys.argv[1::2], sys.argv[2::2]))
    try:
        state = StateDir.of_host(args["--state-dir"], args.get("--host", "emulated"))
        name, link_fd, vmm_pid = args["--name"], int(args["--link-fd"]), int(args["--vmm-pid"])
        metrics_fd = int(args["--metrics-fd"]) if "--metrics-fd" in args else None
    except (KeyError, ValueError):
        raise SystemExit(USAGE) from None
    libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)  # it does not outlive its VMM
    if libc.getppid() != vmm_pid:
        return 1  # its VMM is gone already
    # Nothing of the VMM's but the link and the metrics socket (an fd store's fds are inheritable).
    keep = sorted({link_fd} | ({metrics_fd} if metrics_fd is not None else set()))
    for low, high in zip([0] + [fd + 1 for fd in keep], keep + [1 << 20]):
        if low > 2:
            os.closerange(low, high)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s vmm[{name}] %(levelname)s %(message)s")
    sock = socket.socket(fileno=link_fd)
    metrics_sock = socket.socket(fileno=metrics_fd) if metrics_fd is not None else None

    async def run():
        link = VmLink(trio.socket.from_stdlib_socket(sock))
        try:
            hello, fds = await link.call_fds("hello")
            control = Control(link, hello, Mailbox(fds[0]), state, name, metrics_sock)
            await control.run()
        except VmGone:
            pass  # the VMM is stopping: so are we

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
