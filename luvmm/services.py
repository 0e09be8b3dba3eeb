"""What the VMM and the agent need of a host besides its syscalls, as small
explicit interfaces that the entry points pass in (luvmm.wiring) -- never
found by probing the host object.

* :class:`Units`: the host's init -- start, stop and list units, and say
  which unit a process belongs to (the agent authorizes by it).  luvmm's
  own init (luvmm.liveupdate.init) on the emulated host or under `luvmm boot`,
  over its host's control socket (:class:`InitUnits`); systemd on a real
  host, whose units are cgroups a process cannot leave (:class:`SystemdUnits`).
* :class:`Observer`: an observer on the machine's bus -- DMA completions and
  a guest heartbeat seen from outside the software being measured.  Only an
  emulated machine has one; on a real host it is None and the figures that
  need it are reported as not measured.
* :class:`MachineInfo`: what the machine says of its kernel (profile) and of
  its last kexec (the reboot's phase marks).

Lean on purpose: the restore path imports this module.
"""

from __future__ import annotations

import errno
import os

from luvmm.names import check_vm_name


class Units:
    """The host's init."""

    def start(self, name: str) -> dict:
        raise NotImplementedError

    def stop(self, name: str) -> dict:
        raise NotImplementedError

    def list(self) -> list[dict]:
        """Each unit: ``name``, ``pid``, ``running``, ``returncode``, ``restarts``."""
        raise NotImplementedError

    def unit_of(self, pid: int) -> str | None:
        """The unit process ``pid`` belongs to (``agent``, ``vm-NAME``), or None: an operator's."""
        raise NotImplementedError


class Observer:
    """An observer on the machine's bus."""

    def watch(self, bdf: str, iova: int) -> None:
        """Sample the guest memory word at ``iova`` (through the device's IOMMU domain) every millisecond."""
        raise NotImplementedError

    def observe(self, bdf: str, t0: float, t1: float, iova: int | None = None) -> dict:
        """``{"completions", "max_completion_gap_s"}`` in [t0, t1] (and the watched word's changes)."""
        raise NotImplementedError

    def timeline(self, bdf: str, t0: float, t1: float, bin_s: float, iova: int | None = None) -> dict:
        raise NotImplementedError

    def heartbeat(self, bdf: str, t0: float, t1: float, iova: int) -> list[tuple[float, int]]:
        """The watched word at ``iova`` over [t0, t1]: [(time, value)] where it
        changed, and where it stood before a change (luvmm.vmm.pace reads a guest's
        outage from them)."""
        raise NotImplementedError


class MachineInfo:
    def kernel_profile(self) -> str | None:
        raise NotImplementedError

    def features(self, device: str | None = None) -> dict:
        """What the machine's kernel offers a live update that its syscalls
        alone do not show: ``kho`` (bool or None: unknown), ``kexec_file_load``
        (an errno name: "EBADF" means the call is there and permitted),
        ``iommus`` (the IOMMUs), and for ``device`` its ``driver`` and
        ``iommu_group``."""
        raise NotImplementedError

    def last_kexec(self) -> dict:
        """The last kexec: ``{"marks": {"reboot", "frozen", "booted", ...}}`` (CLOCK_REALTIME), or {}."""
        raise NotImplementedError


class Services:
    """What an entry point hands the VMM and the agent."""

    def __init__(self, *, units: Units | None = None, observer: Observer | None = None,
                 machine: MachineInfo | None = None):
        self.units, self.observer, self.machine = units, observer, machine


class InitUnits(Units):
    """luvmm's own init (luvmm.liveupdate.init), over the control socket of the
    host that runs it: the emulated host's ``host.sock`` (its client,
    luvmm.liveupdate.emu.client), or `luvmm boot`'s ``init.sock``
    (:class:`InitClient`).  ``client.call(request)`` returns (the reply's
    value, fds) or raises OSError; init answers ``unit-start``,
    ``unit-stop``, ``units`` and ``unit-of``."""

    def __init__(self, client):
        self.client = client

    def start(self, name: str) -> dict:
        return self.client.call({"op": "unit-start", "name": name})[0]

    def stop(self, name: str) -> dict:
        return self.client.call({"op": "unit-stop", "name": name})[0]

    def list(self) -> list[dict]:
        return self.client.call({"op": "units"})[0]

    def unit_of(self, pid: int) -> str | None:
        return self.client.call({"op": "unit-of", "pid": pid})[0]


class InitClient:
    """A client of `luvmm boot`'s control socket (``init.sock`` in its state
    dir; a unit finds it in ``$LUVMM_INIT_SOCKET``).  It connects at its
    first request, and again after init went away (it was restarted): a
    unit outlives nothing of init's, but the CLI's client may.  One request
    at a time (a lock: the agent asks from more than one thread).  Lean, as
    this module must be: luvmm.rpc and ``_socket``, imported when first used."""

    def __init__(self, path: str, *, timeout: float = 60.0):
        import _thread

        self.path, self.timeout = path, timeout
        self._sock = None
        self._lock = _thread.allocate_lock()

    def _connect(self):
        import _socket

        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"no luvmm init answers at {self.path}: {e.strerror}") from None
        return sock

    def call(self, request: dict, fds: list[int] = (), *, timeout: float | None = None) -> tuple[object, list[int]]:
        """(the reply's value, its fds), or OSError with the reply's errno
        (ECONNRESET: init went away, ETIMEDOUT: it did not answer)."""
        import errno

        from luvmm import rpc

        with self._lock:
            while True:
                fresh = self._sock is None
                if fresh:
                    self._sock = self._connect()
                try:
                    return rpc.call(self._sock, request, fds, timeout=timeout or self.timeout, who="luvmm's init")
                except rpc.RpcError as e:
                    if e.errno in (errno.ECONNRESET, errno.ETIMEDOUT):
                        self._close()  # a connection whose reply may yet come is not asked again
                    if fresh or e.errno != errno.ECONNRESET:
                        raise OSError(e.errno, e.strerror) from None
                    # An init gone since the last request (restarted): once more, on a new connection.

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close()


class SystemdUnits(Units):
    """A real host's init: each unit is a cgroup (``luvmm-agent.service``,
    ``luvmm-vm@NAME.service``: luvmm/wiring/systemd.py writes them) that a process
    cannot leave.

    Starting a unit enables it too (``systemctl enable --now``), stopping it
    disables it: a unit luvmm starts is part of the host from then on --
    started by every boot, restored after every kexec --, as a unit written
    to the emulated host's state dir is.  ``systemctl`` is the command run
    (a test's own).  subprocess is imported where it is used: the restore
    path imports this module."""

    AGENT = "luvmm-agent.service"
    VM_PREFIX, VM_SUFFIX = "luvmm-vm@", ".service"
    #: systemctl's exit statuses (LSB) -> errno: 4 "no permission", 5 "not installed" (no such unit).
    _ERRNOS = {4: 13, 5: 2}  # EACCES, ENOENT

    def __init__(self, systemctl: "list[str] | tuple[str, ...]" = ("systemctl",), state=None,
                 root: str | None = None, socket_units=None):
        self.systemctl = list(systemctl)
        #: The state dir whose unit definitions say what sockets a VM's unit has (None: none).
        self.state = state
        #: What writes and removes a VM's socket unit (luvmm.wiring.systemd: its
        #: install_vm_sockets, remove_vm_sockets), passed in by the wiring.
        self.socket_units = socket_units
        #: Where the units are written: / (LUVMM_SYSTEMD_ROOT: a test's stand-in systemd's tree).
        self.root = root or os.environ.get("LUVMM_SYSTEMD_ROOT", "/")

    @classmethod
    def systemd_name(cls, name: str) -> str:
        """``agent`` -> luvmm-agent.service, ``vm-NAME`` -> luvmm-vm@NAME.service (ValueError otherwise)."""
        if name == "agent":
            return cls.AGENT
        if name.startswith("vm-"):
            try:
                return f"{cls.VM_PREFIX}{check_vm_name(name[3:])}{cls.VM_SUFFIX}"
            except ValueError:
                pass
        raise ValueError(f"no luvmm unit {name!r} on a real host: agent or vm-NAME")

    @classmethod
    def luvmm_name(cls, unit: str) -> str | None:
        """The other way round; None for a unit not luvmm's."""
        if unit == cls.AGENT:
            return "agent"
        if unit.startswith(cls.VM_PREFIX) and unit.endswith(cls.VM_SUFFIX) \
                and len(unit) > len(cls.VM_PREFIX) + len(cls.VM_SUFFIX):
            return "vm-" + unit[len(cls.VM_PREFIX):-len(cls.VM_SUFFIX)]
        return None

    def _run(self, *args: str) -> str:
        import subprocess

        argv = self.systemctl + list(args)
        what = " ".join(["systemctl"] + list(args))
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            raise OSError(errno.ENOENT, f"{what}: no {self.systemctl[0]} here (is this a systemd host?)") from None
        except subprocess.TimeoutExpired:
            raise OSError(errno.ETIMEDOUT, f"{what}: no answer in 120 s") from None
        if done.returncode:
            lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
            cause = lines[0] if lines else f"exit status {done.returncode}"
            raise OSError(self._ERRNOS.get(done.returncode, 5), f"{what}: {cause}")  # else EIO
        return done.stdout

    def start(self, name: str) -> dict:
        """Enable and start the unit; a VM's sockets (its metrics port: the
        unit's ``sockets`` in the state dir) first get their socket unit,
        which systemd binds and keeps across the VMM's restarts."""
        unit = self.systemd_name(name)
        sockets = self._sockets(name)
        if sockets:
            self.socket_units.install_vm_sockets(name[3:], sockets, self.root)
        try:
            self._run("enable", "--now", unit)
        except OSError:
            if sockets:
                self._remove_sockets(name)
            raise
        return {"name": name, "unit": unit}

    def stop(self, name: str) -> dict:
        unit = self.systemd_name(name)
        self._run("disable", "--now", unit)
        if name.startswith("vm-"):
            self._remove_sockets(name)
        return {"name": name, "unit": unit, "running": False}

    def _sockets(self, name: str) -> list[dict]:
        if self.state is None or self.socket_units is None or not name.startswith("vm-"):
            return []
        unit = next((u for u in self.state.read_units() if u["name"] == name), {})
        return list(unit.get("sockets") or [])

    def _remove_sockets(self, name: str) -> None:
        if self.socket_units is not None:
            self.socket_units.remove_vm_sockets(name[3:], self.root)

    def list(self) -> list[dict]:
        """luvmm's units systemd has loaded (an enabled VM's is, once its
        target started it): as the emulated init's ``units``, plus ``unit``
        and ``state`` (systemd's ActiveState/SubState)."""
        out = self._run("show", "--property=Id,LoadState,ActiveState,SubState,MainPID,ExecMainCode,"
                        "ExecMainStatus,NRestarts", "--", self.AGENT, f"{self.VM_PREFIX}*{self.VM_SUFFIX}")
        units = []
        for block in out.split("\n\n"):
            props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            name = self.luvmm_name(props.get("Id", ""))
            if name is None or props.get("LoadState") in ("not-found", "masked"):
                continue
            pid = _int(props.get("MainPID"))
            code, status = _int(props.get("ExecMainCode")), _int(props.get("ExecMainStatus"))
            # ExecMainCode: CLD_EXITED 1, CLD_KILLED 2, CLD_DUMPED 3; 0: never ran.
            returncode = None if pid or not code else status if code == 1 else -status
            units.append({"name": name, "unit": props["Id"], "pid": pid or None, "running": bool(pid),
                          "returncode": returncode, "restarts": _int(props.get("NRestarts")),
                          "state": f"{props.get('ActiveState', '?')}/{props.get('SubState', '?')}"})
        return sorted(units, key=lambda u: u["name"])

    def unit_of(self, pid: int) -> str | None:
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        for line in lines:
            name = self.luvmm_name(line.rsplit("/", 1)[-1])
            if name is not None:
                return name
        return None


def _int(text) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return 0
