"""What the VMM and the agent need of a host besides its syscalls, as small
explicit interfaces that the entry points pass in (luvmm.wiring) -- never
found by probing the host object.

* :class:`Units`: the host's init -- start, stop and list units, and say
  which unit a process belongs to (the agent authorizes by it).  The
  emulated host's init (liveupdate.emu.services); systemd on a real host,
  whose units are cgroups a process cannot leave (:class:`SystemdUnits`).
* :class:`Observer`: an observer on the machine's bus -- DMA completions and
  a guest heartbeat seen from outside the software being measured.  Only an
  emulated machine has one; on a real host it is None and the figures that
  need it are reported as not measured.
* :class:`MachineInfo`: what the machine says of its kernel (profile) and of
  its last kexec (the reboot's phase marks).

Lean on purpose: the restore path imports this module.
"""

from __future__ import annotations


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


class SystemdUnits(Units):
    """A real host's init: each unit is a cgroup (``luvmm-agent.service``,
    ``luvmm-vm@NAME.service``) that a process cannot leave."""

    def unit_of(self, pid: int) -> str | None:
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        for line in lines:
            leaf = line.rsplit("/", 1)[-1]
            if leaf == "luvmm-agent.service":
                return "agent"
            if leaf.startswith("luvmm-vm@") and leaf.endswith(".service"):
                return "vm-" + leaf[len("luvmm-vm@"):-len(".service")]
        return None
