"""A VM: what the VMM process runs, put together from its parts --

    config       luvmm.vmm.config.VmConfig
    memory       luvmm.vmm.memory.GuestMemory     guest RAM, a sealed memfd
    device       luvmm.vmm.passthrough.Passthrough the passed-through function (a DSA, or
                                            the lab's edu: VFIO cdev + iommufd),
                                            its MMIO and interrupts
    guest        luvmm.vmm.guests.Guest           the firmware under KVM (it drives either
                                            device), or synthetic
    runner       luvmm.vmm.vcpus.Runner           the vCPU threads: pause, resume
    live update  luvmm.vmm.live_update            preserve, prepare, cancel, restore,
                                            recover; the state in luvmm.vmm.machine_state

This module imports no trio and nothing heavy: the restore path after a
kexec runs it before the control plane exists.  Threads: one per vCPU
(KVM_RUN blocks), nothing else.
"""

from __future__ import annotations

import errno
import os
import time

from luvmm.vmm import guest as layout
from luvmm.vmm import live_update
from luvmm.vmm.config import VmConfig
from luvmm.vmm.guests import guest_for
from luvmm.vmm.memory import GuestMemory
from luvmm.vmm.passthrough import Passthrough
from luvmm.vmm.vcpus import Runner


class Clock:
    """Phase timestamps (CLOCK_REALTIME: they cross a kexec, CLOCK_MONOTONIC does not)."""

    def __init__(self):
        self.marks: dict[str, float] = {}

    def mark(self, name: str, at: float | None = None) -> float:
        self.marks[name] = time.time() if at is None else at
        return self.marks[name]


class Vm:
    def __init__(self, host, config: VmConfig):
        config.check()
        self.host = host
        self.config = config
        self.guest = guest_for(config.guest)
        self.memory: GuestMemory | None = None
        self.device = Passthrough(host)
        self.runner = Runner()
        self.kvm = self.vmfd = None
        self.vcpus: list = []
        self.state_memfd = -1
        #: Which of the VM's files are in its LUO session.
        self.preserved: set[str] = set()
        #: The files the running kernel cannot preserve (the device, its iommufd on mainline): why.
        self.unpreservable: dict[str, str] = {}
        #: After a restore: how many transfers in flight at the pause the device completed while the guest was paused.
        self.completed_while_paused: int | None = None
        #: After a restore on a device that came back reset: the transfers its guest's driver does again.
        self.redone = 0

    # --- what the rest of the VMM reads -------------------------------------------------------------

    @property
    def view(self) -> memoryview:
        return self.memory.view

    @property
    def mailbox(self) -> layout.Mailbox:
        return layout.Mailbox(self.memory.view)

    @property
    def dev(self):
        return self.device.dev

    @property
    def bdf(self) -> str:
        return self.device.bdf

    @property
    def crash(self):
        return self.runner.crash

    @property
    def first_run(self) -> float:
        return self.runner.first_run

    @property
    def portal_writes(self) -> int:
        return self.device.portal_writes

    @property
    def bus_master_restored(self) -> bool:
        return self.device.bus_master_restored

    def device_enabled(self) -> bool:
        return self.device.enabled()

    def count_interrupts(self) -> int:
        return self.device.count_interrupts()

    def in_flight(self) -> dict[int, int]:
        """The guest's DMA in flight, as its driver records it in guest RAM."""
        if self.device.kind == "edu":
            return layout.edu_in_flight(self.view)
        return layout.batches_in_flight(self.view)

    def still_in_flight(self, at_pause: dict) -> int:
        """How many of ``at_pause`` (:meth:`in_flight` then) have not completed since."""
        if self.device.kind == "edu":
            return layout.edu_still_in_flight(self.view, at_pause)
        return layout.still_in_flight(self.view, at_pause)

    # --- running ------------------------------------------------------------------------------------

    def cold_boot(self) -> None:
        cfg = self.config
        self.memory = GuestMemory.create(cfg.name, cfg.memory)
        self.device.wire(self.memory, cfg.device)
        layout.load_firmware(self.view, slots=cfg.slots, pairs=cfg.pairs, xfer=cfg.xfer, driver=self.device.kind)
        self.vcpus = self.guest.boot(self)
        self.guest.attach_device(self)
        self.runner.start(self.vcpus, self.step)

    def step(self, cpu) -> bool:
        return self.guest.step(self, cpu)

    def crashed(self, cpu, reason: str) -> bool:
        """A vCPU stopped for good (its guest crashed): said in ``crash``."""
        self.runner.crashed(cpu.id, reason, self.guest.rip(cpu))
        return False

    def pause(self) -> float:
        return self.runner.pause()

    def resume(self) -> float:
        return self.runner.resume()

    def stop(self) -> None:
        self.runner.stop()

    # --- live update (luvmm.vmm.live_update) ---------------------------------------------------------------

    def preserve(self, session) -> None:
        live_update.preserve(self, session)

    def files(self) -> tuple[dict, dict[str, int]]:
        return live_update.files(self)

    def leave_files(self) -> None:
        live_update.leave_files(self)

    def prepare(self, session) -> dict:
        return live_update.prepare(self, session, Clock())

    def cancel(self) -> float:
        return live_update.cancel(self)

    @classmethod
    def restore(cls, host, session, clock: Clock) -> tuple[Vm, object]:
        """Rebuild a VM from its session after a kexec and resume it; returns
        (vm, the machine state it was saved with)."""
        state_fd, state = live_update.retrieve_state(session)
        vm = cls(host, VmConfig.from_dict(state.guest.config))
        live_update.restore_into(vm, session, state_fd, state, clock)
        return vm, state

    @classmethod
    def recover(cls, host, meta: dict, fds: dict[str, int], clock: Clock) -> Vm:
        """Start a VM again on the files a VMM which died left in its unit's fd store."""
        try:
            live_update.check_meta(meta)
            vm = cls(host, VmConfig.from_dict(meta["config"]))
            if not vm.guest.restartable:
                raise OSError(errno.EOPNOTSUPP, f"the {vm.guest.kind} guest keeps its state in the VMM: "
                                                "it cannot be restarted on its RAM")
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        live_update.recover_into(vm, meta, fds, clock)
        return vm

    def close(self) -> None:
        self.stop()
        for vcpu in self.vcpus:
            vcpu.close()
        self.device.close()
