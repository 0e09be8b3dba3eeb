"""The VMM's control plane (trio), started once the guest runs.

* After a restore: verify the guest (its heartbeat and DMA counters move on
  from where they were, the batches in flight at the pause complete), FINISH
  the incoming session, and report the update's measurements to the agent.
* The agent channel: ``prepare`` pauses the VM, saves and preserves it;
  ``cancel`` resumes it (rollback).  A failed prepare rolls back by itself.
* ``vms/NAME/vmm.sock``: ``status`` and ``stop`` for `luvmm vm`.
* Metrics: every update's figures go into ``vms/NAME/metrics.json`` (they
  outlive this process, as counters must), served to Prometheus over HTTP
  when the VM's config has a metrics address.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket

import trio

from metrics.vmm import UpdateStats
from luvmm import rpc, schema
from luvmm.wire import ProtocolError, close_fds, listen_seqpacket
from liveupdate.luo import Session
from vmm import guest
from vmm.exits import ExitStats
from vmm.report import update_report

log = logging.getLogger("luvmm.vmm")
VERIFY_TIMEOUT = 15.0
#: LUVMM_VMM_FAULT (tests), in the VMM that init started cold (not in the one it restarts):
#: die-after-prepare  the VMM exits right after answering ready;
#: die-in-prepare     the VMM exits with its vCPUs paused, before the machine state is saved;
#: refuse-prepare     the VMM answers prepare with an error (EIO), its guest running on.
FAULT = os.environ.get("LUVMM_VMM_FAULT") if os.environ.get("LUVMM_BOOT", "cold") == "cold" else None


class Control:
    def __init__(self, vm, host, services, state, name, agent, clock, restored, boot):
        self.vm, self.host, self.state, self.name = vm, host, state, name
        self.services = services
        self.agent = agent
        self.clock = clock
        self.restored = restored
        self.session: Session | None = None
        self.boot = boot
        self.updates = 0
        self.last_report: dict | None = None
        self.done = trio.Event()
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
        self.exits = ExitStats(vm)

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

    async def serve_metrics(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from metrics import http
        from metrics.core import registry_for
        from metrics.vmm import VmmCollector

        registry = registry_for(VmmCollector(self.name, self.stats, self.vm.mailbox.snapshot, self.vm.config.memory))
        try:
            await http.serve(registry, self.vm.config.metrics, task_status=task_status)
        except OSError as e:  # binding: the VM runs on without its endpoint, and says why
            self.metrics_error = f"cannot serve metrics on {self.vm.config.metrics}: {e.strerror or e}"
            log.error("%s", self.metrics_error)
            task_status.started(None)

    # --- after a restore ------------------------------------------------------------------

    async def verify(self) -> dict:
        incoming, saved = self.restored
        at_pause = saved.timestamps.mailbox_at_pause
        inflight = saved.timestamps.inflight_at_pause
        vm = self.vm
        if not vm.device_enabled():
            log.warning("the device was reset during the update: its DMA stopped"
                        + (" until its driver started it again" if vm.device.was_reset else ""))
        # A device opened again after the kexec (the kernel did not preserve
        # it) is started again by the guest's driver: wait for its DMA too.
        with trio.move_on_after(VERIFY_TIMEOUT if vm.device_enabled() or vm.device.was_reset else 0.2):
            while True:
                now = vm.mailbox.snapshot()
                moved = now["heartbeat"] > at_pause["heartbeat"]
                drained = vm.still_in_flight(inflight) == 0
                if moved and drained and now["completed"] > at_pause["completed"] or vm.crash:
                    break
                await trio.sleep(0.002)
        self.clock.mark("verified")
        after = vm.mailbox.snapshot()
        if vm.bus_master_restored:
            log.warning("the device came back with Bus Master Enable clear: set again, its DMA went on")
        finished = await self._finish(incoming)
        self.clock.mark("finished")
        # The guest's outage is measured over a horizon after the resume
        # (vmm.pace): the report waits for it to pass, and for the observer's
        # last samples of it.  The guest runs meanwhile -- its vCPUs do not
        # need this process's attention -- and the next update waits for it.
        import time

        from vmm.pace import LOST_HORIZON_S
        from vmm.report import OBSERVER_LAG_S

        resumed = vm.first_run or self.clock.marks["resumed"]
        await trio.sleep(max(0.0, resumed + LOST_HORIZON_S + OBSERVER_LAG_S - time.time()))
        report = update_report(vm, self.services, self.clock.marks, saved, after)
        report["finish_error"] = self.finish_error
        # Where the VMM was in the guest's path since the resume: its vCPUs'
        # exits, KVM's and the run loop's counts (vm status shows them live).
        report["exits"] = self.exits.counts() or None
        self.last_report = report
        self.stats.record(report)
        self._save_stats()
        await trio.to_thread.run_sync(self.agent.restored, self.name, report)
        lost = report.get("guest_lost_s")
        log.info("restored: blackout %.1f ms, guest lost %s, %s DMA completions during it",
                 report["blackout_s"] * 1000, "not measured" if lost is None else f"{lost * 1000:.1f} ms",
                 report["dma_completed_during_blackout"])
        return report, finished

    async def _finish(self, incoming) -> bool:
        """FINISH the incoming session.  If the kernel refuses, the VM runs on
        and the session stays (LUO keeps its files): :meth:`finish_later`
        tries again."""
        try:
            await trio.to_thread.run_sync(incoming.finish)
        except OSError as e:
            self.finish_error = f"FINISH failed: {e.strerror or e}"
            log.error("%s; the incoming session stays, retrying", self.finish_error)
            return False
        self.finish_error = None
        return True

    async def finish_later(self, incoming, interval: float = 0.2) -> None:
        while not await self._finish(incoming):
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
                self.prepared = False
                self.vm.cancel()
                self._rolled_back()
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
            reply = self._handle(request)
            die = request.get("op") == "prepare" and "ok" in reply and FAULT == "die-after-prepare"
            if die:  # said first: the kexec may kill us as soon as the agent has the reply
                log.warning("fault injection: the VMM exits after preparing")
                logging.shutdown()
            if not await rpc.trio_send(sock, reply):
                return
            if die:
                os._exit(137)  # fault injection: the VMM dies between "ready" and the kexec

    def _handle(self, request: dict) -> dict:
        try:
            schema.check(schema.CHANNEL, request)
        except ValueError as e:
            return {"errno": errno.EINVAL, "error": str(e)}
        op = request.get("op")
        if op == "ready":
            # An update is coming: make sure the files are in the session,
            # the guest running on; refusing now pauses nothing anywhere.
            if self.prepared:
                return {"errno": errno.EBUSY, "error": f"{self.name}: already prepared"}
            try:
                self.vm.preserve(self.session)
            except OSError as e:
                self.preserve_error = f"PRESERVE_FD failed: {e.strerror or e}"
                return {"errno": e.errno or errno.EIO, "error": self.preserve_error}
            self.preserve_error = None
            return {"ok": True}
        if op == "prepare":
            if FAULT == "die-in-prepare":
                self.vm.pause()
                log.warning("fault injection: the VMM exits with its vCPUs paused, in prepare")
                logging.shutdown()
                os._exit(137)
            if self.prepared:
                return {"errno": errno.EBUSY, "error": f"{self.name}: already prepared"}
            if FAULT == "refuse-prepare":
                log.warning("fault injection: the VMM refuses to prepare")
                return {"errno": errno.EIO, "error": "prepare refused (fault injection)"}
            try:
                phases = self.vm.prepare(self.session)
            except OSError as e:
                log.error("prepare failed: %s; resuming", e)
                self.vm.cancel()
                self._rolled_back()
                return {"errno": e.errno or errno.EIO, "error": f"{self.name}: prepare failed: {e}"}
            self.preserve_error = None
            self.prepared = True
            self.updates += 1
            return {"ok": {"phases": phases}}
        if op == "cancel":
            if self.prepared:
                self.prepared = False
                self.vm.cancel()
                self._rolled_back()
            return {"ok": True}
        return {"errno": errno.EINVAL, "error": f"unknown request {op!r}"}

    def _rolled_back(self) -> None:
        self.stats.record_rollback()
        self._save_stats()

    # --- vmm.sock ----------------------------------------------------------------------------------

    def status(self) -> dict:
        vm = self.vm
        mb = vm.mailbox.snapshot()
        return {"name": self.name, "pid": os.getpid(), "boot": self.boot, "config": vm.config.to_dict(),
                "bdf": vm.bdf,
                "guest_state": "paused" if self.prepared else guest.GUEST_STATE.get(mb["state"], str(mb["state"])),
                "mailbox": mb, "crash": vm.crash and vars(vm.crash), "interrupts": vm.count_interrupts(),
                "portal_writes": vm.portal_writes, "updates_prepared": self.updates,
                "ready": self.ready, "prepared": self.prepared, "metrics_port": self.metrics_port, "metrics_error": self.metrics_error,
                "preserve_error": self.preserve_error, "finish_error": self.finish_error,
                "last_update": self.last_report, "exits": self.exits.status(), "guest_path": vm.device.guest_path()}

    async def sample_exits(self) -> None:
        """The exit counts every second: `vm status` shows their rates over the last one."""
        while True:
            self.exits.sample()
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
            return self.status(), []
        if request["op"] == "stop":
            self.done.set()
            return True, []
        raise OSError(errno.EINVAL, f"unknown request {request['op'][:40]!r}")


def run_control_plane(vm, host, services, state, name, agent, clock, restored, boot) -> int:
    control = Control(vm, host, services, state, name, agent, clock, restored, boot)

    async def main():
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(control.serve_local)
                if restored:
                    _, finished = await control.verify()
                    if not finished:
                        nursery.start_soon(control.finish_later, restored[0])
                # A cold-booted VM has new files: a session an earlier VMM of
                # this name left behind describes a VM that is gone.
                session_fd, created = agent.create_session(name, fresh=boot == "cold")
                control.session = Session(host, session_fd, name)
                if created:
                    vm.preserved = set()  # a new session holds none of the files an earlier one did
                try:
                    vm.preserve(control.session)
                except OSError as e:  # the VM runs on; prepare tries again, and refuses the update if it fails
                    control.preserve_error = f"PRESERVE_FD failed: {e.strerror or e}"
                    log.error("%s; an update will try again", control.preserve_error)
                vm.leave_files()
                if services.observer is not None:  # an observer on the machine's bus (emulated hosts have one)
                    services.observer.watch(vm.bdf, guest.offset("heartbeat"))
                await nursery.start(control.agent_channel)
                if vm.config.metrics is not None:
                    control.metrics_port = await nursery.start(control.serve_metrics)
                control.ready = True

                nursery.start_soon(control.sample_exits)

                async def on_signal():
                    async for _ in signals:
                        control.done.set()
                nursery.start_soon(on_signal)
                await control.done.wait()
                nursery.cancel_scope.cancel()

    trio.run(main)
    agent.retry = False  # going away: no waiting for an agent that is gone
    try:
        agent.release(name)  # stopped: the VM is going away, its session and files with it
    except OSError:
        pass
    vm.close()
    return 0
