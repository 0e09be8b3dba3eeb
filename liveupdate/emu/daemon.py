"""The emulated host daemon (`luvmm host start`): machine, kernel and init in one process.

* The **machine** (:class:`luvmm.liveupdate.emu.machine.Machine`) is the hardware; it is
  created once and never reboots.
* The **kernel** (:class:`luvmm.liveupdate.emu.kernel.core.Kernel`) serves the emulated
  device files; it is replaced at every kexec by a new one built from the KHO
  image alone.  Each emulated file is served by a task in the kernel's own
  nursery, so dropping the kernel cancels them all.
* **Init** (:class:`luvmm.liveupdate.init.Init`, luvmm's own) starts the units (the
  agent and one VMM per VM) from unit files in the state dir; the daemon
  stops them at kexec (a process does not outlive its kernel: not one more
  instruction of theirs runs), has init start them again after it, and
  kills the stopped ones once the new units' guests run (their teardown
  is the emulation's, which a real kexec does not have: not in the
  blackout).  The units' sockets (a VM's metrics
  port) stay bound through it: the daemon is the machine, and a local user
  lives outside it, on the real kernel, where a port the emulated kexec let
  go would be anyone's to take.  They are closed when their unit is
  stopped, and when the host stops.

A malformed message gets an error reply and the daemon goes on serving; an
unexpected failure inside a request is logged and answered with EIO.

Why this long: it wires the machine, the kernel and init, answers the control
socket and performs the emulated kexec; each part is short, and they share the
daemon's state.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import struct
import sys
import time

import trio

from luvmm import rpc, schema
from luvmm.abi import IOCTLS
from luvmm.uapi import load_all
from luvmm.peer import identify
from luvmm.wire import (
    MAX_FDS,
    MAX_MESSAGE,
    OP_IOCTL,
    OP_PREAD,
    OP_PWRITE,
    OP_PWRITE_POSTED,
    REPLY,
    REQUEST,
    ProtocolError,
    ancillary,
    close_fds,
    fds_from_ancillary,
    listen_seqpacket,
)
from luvmm.uapi.pci_regs import PCI_COMMAND_MASTER
from luvmm.liveupdate.emu import faults
from luvmm.liveupdate.emu.kernel import kho
from luvmm.liveupdate.emu.kernel.core import Kernel, KernelError, KernelPanic
from luvmm.liveupdate.emu.machine import Machine
from luvmm.liveupdate.emu.observer import Observer
from luvmm.liveupdate.init import Init
from luvmm.liveupdate.state import StateDir, StateError, keep_off_guest_cpus, lock_file, use_every_cpu

log = logging.getLogger("luvmm.host")

PROFILES = ("continuous-dma", "reset-on-freeze")


#: Who may ask what on host.sock (HostDaemon.authorize).
ANYONE_OPS = frozenset({"open", "listdir", "status", "units", "watch", "observe", "timeline", "heartbeat"})
AGENT_OPS = frozenset({"kexec", "unit-of"})
OPERATOR_OPS = frozenset({"stop", "faults", "unit-start", "unit-stop"})
#: What a halted machine (a kernel panic at boot) cannot do: EIO.
HALTED_OPS = frozenset({"open", "listdir", "kexec", "unit-start", "watch"})
UNKNOWN = object()
MAX_CONNECTIONS_PER_PEER = 64
MAX_CONNECTIONS = 1024
#: fds the daemon keeps for itself (logs, units' spawns, the reserve) beyond connections and emulated files.
FD_RESERVE = 256


def _time(value) -> float:
    """A time in a request: a finite number (NaN or infinity is EINVAL, not a reply that cannot be encoded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"not a number: {value!r}")
    t = float(value)
    if t != t or t in (float("inf"), float("-inf")):
        raise ValueError(f"not a finite number: {value!r}")
    return t


def _int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"not an integer: {value!r}")
    return value


class StartError(RuntimeError):
    """The daemon cannot start (said on its ready fd, in one line)."""


class HostDaemon:
    def __init__(self, state: StateDir, *, devices: int = 1, profile: str = "continuous-dma",
                 dsa_bandwidth: float | None = None, metrics: str | None = None):
        if profile not in PROFILES:
            raise ValueError(f"unknown kernel profile {profile!r}")
        load_all()
        self.state = state
        self.profile = profile
        self.machine = Machine(devices, dsa_bandwidth=dsa_bandwidth)
        self.generation = 0
        self.kernel: Kernel | None = None
        self._kernel_nursery: trio.Nursery | None = None
        self._kernel_scope: trio.CancelScope | None = None
        self.init = Init(state, generation=lambda: self.generation, unit_env={"LUVMM_HOST_SOCKET": state.socket})
        self.kexec_count = 0
        self.kexec_refused = 0
        self.kho_refused = 0
        self.kexec_seconds: list[float] = []
        self.last_kho_error: str | None = None
        #: The panic message, once the kernel has panicked: the machine is halted
        #: (no syscall, no reboot, no unit runs) until it is stopped.
        self.panic: str | None = None
        self.started = time.time()
        self._stop = trio.Event()
        self.finished = trio.Event()
        self._kexec_lock = trio.Lock()
        self.faults = faults.Faults.from_env()
        self.observer = Observer(self.machine)
        self.last_kexec: dict = {}
        #: Prometheus metrics: where to serve them ([ADDRESS:]PORT), and the port once bound.
        self.metrics_listen = metrics
        self.metrics_port: int | None = None


    # --- life cycle -------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # The emulated machine and kernel are Python on this machine's CPUs; a
        # real device and its DMA take none of the guests'.  Off the guest
        # CPUs, the DSA engines for good, this thread -- the kernel, init, the
        # observer -- but during a kexec (self.kexec: the guests are paused).
        self.machine.start()
        listener = self._listen()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.init.nursery = nursery
                self.init.listen_notify()
                nursery.start_soon(self.init.serve_notify)
                nursery.start_soon(self.init.reap_orphans)
                await self._boot(None)
                nursery.start_soon(rpc.Listener(per_peer=MAX_CONNECTIONS_PER_PEER, total=MAX_CONNECTIONS,
                                                who="the emulated host").run, listener, self._control, nursery)
                nursery.start_soon(self.observer.run)
                if self.metrics_listen is not None:
                    from luvmm.metrics import http
                    from luvmm.metrics.core import registry_for
                    from luvmm.metrics.host import HostCollector

                    try:
                        self.metrics_port = await nursery.start(http.serve, registry_for(HostCollector(self)),
                                                                self.metrics_listen)
                    except OSError as e:
                        raise StartError(f"cannot serve metrics on {self.metrics_listen}: "
                                         f"{e.strerror or e}") from None
                await self.init.start_all(boot="cold")
                task_status.started()
                await self._stop.wait()
                await self.init.reap(self.init.kill_all(), everything=True)
                nursery.cancel_scope.cancel()
        finally:
            listener.close()
            self.init.close_sockets()
            if self.init.notify_sock is not None:
                self.init.notify_sock.close()
            if self.kernel is not None:
                self.kernel.drop()
            self.machine.shutdown()
            try:
                os.unlink(self.state.socket)
            except FileNotFoundError:
                pass
            self.finished.set()

    def stop(self) -> None:
        self._stop.set()

    def _listen(self) -> trio.socket.SocketType:
        return trio.socket.from_stdlib_socket(listen_seqpacket(self.state.socket))

    async def _boot(self, tree: dict | None) -> None:
        self.generation += 1
        self._kernel_nursery = await self._nursery.start(self._kernel_tasks)
        self.kernel = Kernel(self.machine, profile=self.profile, generation=self.generation, spawn=self._spawn,
                             closing=trio.lowlevel.notify_closing)
        self.kernel.faults = self.faults
        self.kernel.kill_unit = self.init.kill_unit
        self.kernel.max_files = max(64, fd_limit() - MAX_CONNECTIONS - FD_RESERVE)
        if tree is not None:
            try:
                self.kernel.restore(tree)
            except KernelPanic as e:
                # luo_restore_fail() is panic(): the new kernel does not boot on
                # without the sessions -- the machine halts, with the message.
                log.critical("Kernel panic - not syncing: %s", e)
                self.panic = str(e)
                self.kernel.dropping = True
                self.kernel.drop()

    async def _kernel_tasks(self, *, task_status) -> None:
        with trio.CancelScope() as scope:
            self._kernel_scope = scope
            async with trio.open_nursery() as nursery:
                task_status.started(nursery)
                await trio.sleep_forever()

    def _spawn(self, file) -> None:
        self._kernel_nursery.start_soon(self._serve_file, self.kernel, file)

    # --- emulated files -----------------------------------------------------------------------

    async def _serve_file(self, kernel: Kernel, file) -> None:
        sock = trio.socket.from_stdlib_socket(file.sock)
        try:
            while True:
                # Taken and served with no checkpoint in between (trio's own
                # recvmsg yields after the syscall): a request this task took
                # is served by the kernel it was made to, never by one a
                # kexec replaced meanwhile -- a posted write would be lost.
                try:
                    data, anc, flags, _ = file.sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4),
                                                            socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    try:
                        await trio.lowlevel.wait_readable(file.sock)
                    except (OSError, trio.ClosedResourceError):
                        break
                    continue
                except OSError:
                    break
                if not data:
                    break
                tag = REQUEST.unpack_from(data)[3] if len(data) >= REQUEST.size else 0
                try:
                    fds = fds_from_ancillary(anc, flags)
                except ProtocolError:
                    await self._send(sock, REPLY.pack(-1, errno.EINVAL, tag), [])
                    continue
                out_fds: list[int] = []
                try:
                    result, err, payload, out_fds = self._file_request(kernel, file, data, fds)
                finally:
                    close_fds(fds)
                if data[0] == OP_PWRITE_POSTED:
                    continue  # posted: no reply, its error (if any) dropped as a bus drops it
                stall = kernel.take_stall()
                if stall:
                    await trio.sleep(stall)  # an injected stall: this caller waits, the machine runs on
                try:
                    await self._send(sock, REPLY.pack(result, err, tag) + payload, out_fds)
                finally:
                    close_fds(out_fds)
        finally:
            if not kernel.dropping:
                kernel.release(file)

    @staticmethod
    async def _send(sock, data: bytes, fds) -> None:
        try:
            await sock.sendmsg([data], ancillary(fds))
        except OSError:
            pass  # the caller is gone

    def _file_request(self, kernel: Kernel, file, data: bytes, fds: list[int]) -> tuple[int, int, bytes, list[int]]:
        """(result, errno, payload, fds) of one request on an emulated file."""
        if len(data) < REQUEST.size:
            return -1, errno.EINVAL, b"", []
        op, arg32, arg64, _ = REQUEST.unpack_from(data)
        payload = bytearray(data[REQUEST.size:])
        try:
            if op == OP_IOCTL:
                definition = IOCTLS.get(arg32)
                if definition is not None and definition.argtype is not None:
                    if len(payload) != arg64:
                        raise KernelError(errno.EFAULT)
                    arg = 0
                else:
                    arg = arg64
                result = file.ioctl(arg32, definition, payload, fds, arg)
                out_fds: list[int] = []
                if isinstance(result, tuple):
                    result, out_fds = result
                return result, 0, bytes(payload), out_fds
            if op == OP_PREAD:
                out = file.pread(arg32, arg64)
                return len(out), 0, out, []
            if op in (OP_PWRITE, OP_PWRITE_POSTED):
                if len(payload) != arg32:
                    raise KernelError(errno.EINVAL)
                return file.pwrite(bytes(payload), arg64), 0, b"", []
            raise KernelError(errno.EINVAL, f"unknown operation {op}")
        except KernelError as e:
            return -1, e.errno, getattr(e, "payload", b""), []
        except OSError as e:  # a resource ran out (EMFILE, ENFILE, ENOMEM): the kernel's own errno
            return -1, e.errno or errno.EIO, b"", []
        except (ValueError, struct.error) as e:
            log.info("bad request on %s: %s", file.describe(), e)
            return -1, errno.EINVAL, b"", []
        except MemoryError:  # out of memory is ENOMEM, as a kernel says it, never EIO
            return -1, errno.ENOMEM, b"", []
        except Exception:
            log.exception("request on %s failed", file.describe())
            return -1, errno.EIO, b"", []

    # --- control socket ---------------------------------------------------------------------------

    async def _control(self, conn) -> None:
        peer = [UNKNOWN]  # looked up at the first request that needs it (luvmm.peer: fixed at connect)

        async def handle(request: dict, fds: list[int]):
            try:
                op = request["op"]
                if op != "hello" and peer[0] is UNKNOWN:
                    try:
                        peer[0] = identify(conn, self.init.unit_of)
                    except PermissionError as e:
                        peer[0] = None
                        log.warning("%s", e.strerror)
                self.authorize(op, peer[0])
                return await self._control_request(request, fds, conn)
            finally:
                close_fds(fds)

        with conn:
            try:
                await rpc.serve_connection(conn, handle, schema=schema.HOST, log=log, after=self._after_reply)
            finally:
                self.observer.release(conn)

    def authorize(self, op: str, peer) -> None:
        """Who may ask what of the machine (docs/faults-and-security.md: the
        trust model).  The emulated syscalls (open, listdir) and what reads
        the machine (status, units, the bus observer) are anyone's; the
        reboot and unit-of, the agent's and the operator's; init, fault
        injection and stopping the machine, the operator's (a process of no
        unit) only."""
        if op == "hello":
            return
        if peer is None or peer is UNKNOWN:
            raise PermissionError(errno.EPERM, f"{op}: refused to a peer that cannot be identified")
        if op in ANYONE_OPS:
            return
        if op in AGENT_OPS and peer.unit in (None, "agent"):
            return
        if op in OPERATOR_OPS and peer.unit is None:
            return
        if op not in ANYONE_OPS | AGENT_OPS | OPERATOR_OPS:
            raise KernelError(errno.EINVAL, f"unknown request {op[:40]!r}")
        raise PermissionError(errno.EPERM, f"{op}: refused to a process of unit {peer.unit} (it is the operator's)")

    def _after_reply(self, request: dict, reply: dict) -> None:
        if reply.get("ok") == "stopping":
            self.stop()

    async def _control_request(self, request: dict, fds: list[int], conn=None):
        op = request["op"]
        if op == "hello":
            return {"pid": os.getpid(), "generation": self.generation}, []
        if self.panic is not None and op in HALTED_OPS:
            raise KernelError(errno.EIO, f"the machine is halted: kernel panic: {self.panic}")
        if op == "open":
            path, flags = request["path"], int(request.get("flags", os.O_RDWR))
            if not isinstance(path, str):
                raise TypeError("path must be a string")
            return True, [self.kernel.open(path, flags)]
        if op == "listdir":
            return self.kernel.listdir(str(request["path"])), []
        if op == "kexec":
            return await self.kexec(), []
        if op == "status":
            return self.status(), []
        if op == "stop":
            return "stopping", []
        if op == "watch":
            self.observer.watch(str(request["bdf"]), _int(request["iova"]), owner=conn)
            return True, []
        if op == "observe":
            iova = request.get("iova")
            return self.observer.observe(str(request["bdf"]), _time(request["t0"]), _time(request["t1"]),
                                         None if iova is None else _int(iova)), []
        if op == "timeline":
            iova = request.get("iova")
            return self.observer.timeline(str(request["bdf"]), _time(request["t0"]), _time(request["t1"]),
                                          _time(request["bin_s"]), None if iova is None else _int(iova)), []
        if op == "heartbeat":
            return self.observer.heartbeat(str(request["bdf"]), _time(request["t0"]), _time(request["t1"]),
                                           _int(request["iova"])), []
        if op in ("units", "unit-of", "unit-start", "unit-stop"):
            return await self.init.request(request), []
        if op == "faults":
            if request.get("clear"):
                self.faults.clear()
            if request.get("set"):
                self.faults.set(str(request["set"]))
            return self.faults.describe(), []
        raise KernelError(errno.EINVAL, f"unknown request {op!r}")

    # --- kexec --------------------------------------------------------------------------------------

    async def kexec(self) -> dict:
        """reboot(LINUX_REBOOT_CMD_KEXEC) with LUO: freeze, hand over, reboot."""
        async with self._kexec_lock:
            started = time.monotonic()
            marks = {"reboot": time.time()}
            kernel = self.kernel
            # The guests are paused (their VMMs prepared them): their CPUs are
            # free for the kexec and the restore, until they run again.
            use_every_cpu()
            self._deliver_posted(kernel)
            try:
                clear_bus_master = await self._kexec_faults()
                tree = kernel.freeze()  # a KernelError here: nothing happened, the caller gets the errno
            except KernelError:
                self.kexec_refused += 1
                keep_off_guest_cpus()
                raise
            stall = kernel.take_stall()
            if stall:
                await trio.sleep(stall)  # an injected stall in a freeze callback
            image = kho.encode_image(tree)
            bdfs, domains, memory = kernel.preserved_hardware()
            image = self.faults.kho_image(image)
            marks["frozen"] = time.time()
            # From here the old kernel is gone: nothing it served may run a
            # release path (a dying process's last close must not unpreserve).
            kernel.dropping = True
            self._kernel_scope.cancel()
            running = list(self.init.procs)  # the units' names, from memory: no disk read in the blackout
            dying = self.init.kill_all(signal.SIGSTOP)  # not one more instruction: killed once the guests run
            self._unlink_unit_sockets(running)
            kernel.drop()
            self.machine.reset_for_kexec(bdfs, domains, memory)
            if clear_bus_master:
                for bdf in bdfs:
                    log.warning("injected fault: the new kernel clears Bus Master Enable of %s", bdf)
                    self.machine.devices[bdf].set_command_bits(PCI_COMMAND_MASTER, False)
            self.kexec_count += 1
            try:
                new_tree = kho.decode_image(image)
                self.last_kho_error = None
            except kho.KhoError as e:
                log.error("the new kernel refused the KHO image: %s", e)
                self.last_kho_error = str(e)
                self.kho_refused += 1
                new_tree = None
            await self._boot(new_tree)
            marks["booted"] = time.time()
            if self.panic is not None:
                self.last_kexec = {"generation": self.generation, "kho_bytes": len(image),
                                   "kho_error": self.last_kho_error, "panic": self.panic, "marks": marks}
                keep_off_guest_cpus()  # a halted machine runs no guest, nor restores one
                await self.init.bury(dying)
                return self.last_kexec
            await self.init.start_all(boot="kexec")
            marks["spawned"] = time.time()
            await self._guests_running()
            await self.init.bury(dying)  # off the blackout's path: the new units' guests run
            marks["reaped"] = time.time()
            self.kexec_seconds.append(time.monotonic() - started)
            self.last_kexec = {"generation": self.generation, "seconds": self.kexec_seconds[-1],
                               "kho_bytes": len(image), "kho_error": self.last_kho_error, "marks": marks}
            return self.last_kexec

    def _deliver_posted(self, kernel: Kernel) -> None:
        """Posted writes still queued on the files' sockets reach their
        device before the freeze, as a posted PCIe write reaches its device
        before anything its CPU does after it: a descriptor a VMM stored
        just before its pause is in the device when the kexec comes, never
        dropped with the old kernel's files.  Only OP_PWRITE_POSTED messages
        (the VMMs are paused); anything else stays for its file's task."""
        for file in list(kernel.files.values()):
            while file.sock is not None:
                try:
                    head = file.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except OSError:  # nothing queued (EAGAIN), or the peer gone
                    break
                if head[:1] != bytes([OP_PWRITE_POSTED]):
                    break
                data, anc, flags, _ = file.sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4),
                                                         socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
                try:
                    fds = fds_from_ancillary(anc, flags)
                except ProtocolError:
                    continue
                try:
                    self._file_request(kernel, file, data, fds)
                finally:
                    close_fds(fds)

    def _unlink_unit_sockets(self, units: list[str]) -> None:
        """The old units' sockets go with their kernel, as on a real host,
        where they are in /run (a tmpfs no boot inherits).  Stopped, not yet
        dead, their processes still listen on them: a new unit that connected
        to one (a restoring VMM looking for the agent) would wait for an
        answer that never comes; it finds none and waits for the new one."""
        vms = [name[3:] for name in units if name.startswith("vm-")]
        for path in [self.state.agent_socket] + [self.state.vmm_socket(vm) for vm in vms]:
            try:
                os.unlink(path)
            except (OSError, ValueError):
                pass

    async def _guests_running(self, timeout: float = 10.0) -> None:
        """Wait until every restored VMM says its guest runs again
        (READY=1), or gave up (exited), or ``timeout``; then back off the
        guest CPUs."""
        vms = [u["name"] for u in self.state.read_units() if u["name"].startswith("vm-")]
        try:
            await self.init.wait_ready(vms, timeout)
        finally:
            keep_off_guest_cpus()

    async def _kexec_faults(self) -> bool:
        """Injected faults at the reboot call (luvmm.liveupdate.emu.faults); True if the
        new kernel is to clear Bus Master Enable of the preserved devices."""
        clear_bus_master = False
        for rule in self.faults.at("kexec"):
            if rule.action == "stall":
                await trio.sleep(rule.seconds)
            elif rule.action == "kill":
                self.init.kill_unit(rule.unit, "injected fault at kexec")
                raise KernelError(errno.EINTR, f"injected fault: {rule.unit} killed before the reboot")
            elif rule.action == "clear-bus-master":
                clear_bus_master = True
        return clear_bus_master

    def status(self) -> dict:
        return {
            "pid": os.getpid(),
            "state_dir": self.state.path,
            "uptime_s": round(time.time() - self.started, 3),
            "kernel_profile": self.profile,
            "kexec_count": self.kexec_count,
            "kexec_refused": self.kexec_refused,
            "metrics_port": self.metrics_port,
            "kexec_seconds": [round(s, 4) for s in self.kexec_seconds],
            "last_kho_error": self.last_kho_error,
            "panic": self.panic,
            "disk_error": self.init.log_error,
            "faults": self.faults.describe(),
            "fault_hits": self.faults.hits,
            "last_kexec": self.last_kexec,
            "kernel": self.kernel.status(),
            "machine": {
                "memory": [{"inode": m.key[1], "bytes": m.size} for m in self.machine.memory.values()],
                "held_memory": [k[1] for k in self.machine.held],
                "domains": sorted(self.machine.domains),
            },
            "units": self.init.status(),
        }


def fd_limit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_fd_limit() -> int:
    """The machine's files are the daemon's fds: its soft limit goes up to
    the hard one (a real kernel holds thousands of sessions; 1024 would
    not).  Returns the limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m luvmm.liveupdate.emu.daemon", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--kernel-profile", choices=PROFILES, default="continuous-dma")
    parser.add_argument("--dsa-bandwidth", type=float, default=None, help="bytes per second (default: unlimited)")
    parser.add_argument("--metrics-port", metavar="[ADDRESS:]PORT", default=None,
                        help="serve Prometheus metrics over HTTP (loopback unless ADDRESS is given)")
    parser.add_argument("--ready-fd", type=int, default=None, help="write 'ready' to this fd when serving")
    parser.add_argument("--lock-fd", type=int, default=None,
                        help="the state dir's host lock, taken by whoever started this daemon (default: taken here)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.setswitchinterval(0.0005)  # keep serving while the DSA engines run Python
    keep_off_guest_cpus()  # before any thread starts: they inherit it (HostDaemon.run says why)
    state = StateDir(args.state_dir)
    raise_fd_limit()

    def failed(why: str) -> int:
        log.error("cannot start: %s", why)
        if args.ready_fd is not None:
            os.write(args.ready_fd, f"error {why}\n".encode())
        return 1

    try:
        state.ensure()
        # One host per state dir: the lock (luvmm.liveupdate.emu.hostctl.start), held
        # for this process's life and by none of its units.
        if args.lock_fd is not None:
            os.set_inheritable(args.lock_fd, False)
        elif lock_file(state.host_lock) is None:
            return failed(f"an emulated host is already running (or starting) in {state.path}")
        daemon = HostDaemon(state, devices=args.devices, profile=args.kernel_profile,
                            dsa_bandwidth=args.dsa_bandwidth, metrics=args.metrics_port)
    except (StateError, ValueError) as e:
        return failed(str(e))

    async def serve():
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                async def on_signal():
                    async for _ in signals:
                        daemon.stop()
                nursery.start_soon(on_signal)
                await nursery.start(daemon.run)
                state.write_pid(os.getpid())
                if args.ready_fd is not None:
                    os.write(args.ready_fd, b"ready\n")
                    os.close(args.ready_fd)
                await daemon.finished.wait()
                nursery.cancel_scope.cancel()

    try:
        trio.run(serve)
    except StartError as e:
        return failed(str(e))
    finally:
        state.clear_pid()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
