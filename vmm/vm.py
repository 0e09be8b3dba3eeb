"""A VM: guest RAM, KVM vCPUs, the passed-through DSA, and its live update.

This module imports no trio and nothing heavy: the restore path after a kexec
runs it before the control plane exists.  Threads: one per vCPU (KVM_RUN
blocks), nothing else.

Guest RAM is a memfd sealed with F_SEAL_SEAL|F_SEAL_GROW|F_SEAL_SHRINK,
mapped into KVM and into an IOAS at IOVA = GPA with IOMMU_IOAS_MAP_FILE; the
device is bound to the iommufd and attached to a HWPT that is marked for
preservation when the VM prepares for an update.  MMIO exits on the BARs go
to the device's VFIO regions; the eight 8-byte stores of a portal write are
combined into one 64-byte descriptor write.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import _thread
import time

from liveupdate import fdstore
from liveupdate.state import check_vm_name
from luvmm.abi import ffi
from devices.dsa_regs import IDXD_DEVICE_STATE_ENABLED, IDXD_GENSTATS_OFFSET
from devices.iommufd import IommuFd
from luvmm.uapi.pci_regs import PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY
from devices.vfio import VfioDevice
from luvmm.uapi.vfio import VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_BAR2_REGION_INDEX
from vmm import guest, machine_state, movdir64b
from vmm.kvm import Kvm
from luvmm.uapi.kvm import (
    KVM_CAP_EXIT_ON_EMULATION_FAILURE,
    KVM_EXIT_FAIL_ENTRY,
    KVM_EXIT_HLT,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_MMIO,
    KVM_EXIT_NAMES,
    KVM_EXIT_SHUTDOWN,
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
)
from vmm.x86 import identity_page_tables, page_table_bytes, setup_cpuid, setup_long_mode, user_rflags

# LUO tokens of the files a VM preserves (fixed: the restored VMM asks for them by number).
RAM_TOKEN = 0x10
IOMMUFD_TOKEN = 0x11
DEVICE_TOKEN = 0x12
STATE_TOKEN = 0x13
HWPT_TOKEN = 0x14
TOKENS = {"ram": RAM_TOKEN, "iommufd": IOMMUFD_TOKEN, "device": DEVICE_TOKEN, "state": STATE_TOKEN}

BAR0_SIZE, BAR2_SIZE = 64 << 10, 128 << 10
MSIX_VECTORS = 9
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK


class VmConfig:
    """A VM's configuration (vms/NAME/config.json).  A plain class, not a
    dataclass: ``dataclasses`` costs tens of milliseconds on the restore path."""

    FIELDS = ("name", "memory", "vcpus", "device", "guest", "slots", "pairs", "xfer", "metrics")

    def __init__(self, name: str, memory: int = 256 << 20, vcpus: int = 1, device: str = "auto",
                 guest: str = "firmware", slots: int = 32, pairs: int = 4, xfer: int = 16 << 10,
                 metrics: str | None = None):
        self.name, self.memory, self.vcpus, self.device, self.guest = name, memory, vcpus, device, guest
        self.slots, self.pairs, self.xfer = slots, pairs, xfer
        #: where the VMM serves Prometheus metrics, "[ADDRESS:]PORT" (None: not served)
        self.metrics = metrics

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> VmConfig:
        return cls(**{k: d[k] for k in cls.FIELDS if k in d})

    def __repr__(self) -> str:
        return f"VmConfig({self.to_dict()})"

    def check(self) -> None:
        check_vm_name(self.name)
        if not isinstance(self.memory, int) or self.memory < guest.MIN_MEMORY or self.memory % (2 << 20):
            raise ValueError(f"memory must be a multiple of 2 MiB and at least {guest.MIN_MEMORY >> 20} MiB")
        if not 1 <= self.vcpus <= 16:
            raise ValueError("vcpus must be 1..16")
        if self.guest not in ("firmware", "synthetic"):
            raise ValueError("guest must be firmware or synthetic")
        if guest.DMA_BASE + guest.workload_bytes(self.slots, self.pairs, self.xfer) > min(
                self.memory, guest.LOW_RAM_LIMIT):
            raise ValueError("the DMA workload does not fit in guest RAM: lower slots, pairs or xfer")
        if not 1 <= self.slots <= 64 or not 1 <= self.pairs <= 16 or self.xfer % 8 or not 8 <= self.xfer <= 1 << 20:
            raise ValueError("slots 1..64, pairs 1..16, xfer a multiple of 8 up to 1 MiB")


def _synthetic():
    from vmm.synthetic import SyntheticCpu  # only for synthetic guests

    return SyntheticCpu


def _is_synthetic(vcpu) -> bool:
    return type(vcpu).__name__ == "SyntheticCpu"


def sealed_memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd


class Monitor:
    """A lock with threading.Condition's notify_all/wait_for, on _thread alone.

    The vCPU threads park and resume through it.  `threading` (with functools
    and collections) costs ~4 ms to import, and the restore path starts the
    vCPUs before anything but the standard library's core is loaded.
    """

    def __init__(self):
        self._lock = _thread.allocate_lock()
        self._waiters: list = []

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def notify_all(self) -> None:
        """Wake every waiter (the caller holds the lock)."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.release()

    def wait_for(self, predicate, timeout: float | None = None) -> bool:
        """Wait (holding the lock, released meanwhile) until ``predicate()``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not predicate():
            left = -1 if deadline is None else deadline - time.monotonic()
            if deadline is not None and left <= 0:
                return False
            waiter = _thread.allocate_lock()
            waiter.acquire()
            self._waiters.append(waiter)
            self._lock.release()
            try:
                waiter.acquire(True, left)
            finally:
                self._lock.acquire()
                if waiter in self._waiters:  # timed out: nobody will release it
                    self._waiters.remove(waiter)
        return True


class GuestCrash:
    def __init__(self, vcpu: int, reason: str, rip: int = 0):
        self.vcpu, self.reason, self.rip = vcpu, reason, rip


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
        self.kvm: Kvm | None = None
        self.vmfd = None
        self.vcpus = []
        self.memfd = -1
        self.ram: mmap.mmap | None = None
        self.view: memoryview | None = None
        self.iommufd: IommuFd | None = None
        self.ioas = self.hwpt = self.dev_id = 0
        self.dev: VfioDevice | None = None
        self.bdf = ""
        self.eventfds: list[int] = []
        self.msix_armed = False
        self.interrupts = 0
        self.clock = Clock()
        self.crash: GuestCrash | None = None
        self.mmio_unhandled = 0
        self.portal_writes = 0
        self._cond = Monitor()
        self._pause = False
        self._stop = False
        self._parked = 0
        self._threads: list = []  # one lock per vCPU thread, held until it ends
        self.last_stop = 0.0
        self.first_run = 0.0
        #: After a restore: the device came back with Bus Master Enable clear, and the VMM set it again.
        self.bus_master_restored = False
        self._portal = {}
        self.state_memfd = -1
        self.preserved: set[str] = set()  # which of the VM's files are in its LUO session

    # --- memory -----------------------------------------------------------------------------

    def _map_ram(self, memfd: int) -> None:
        self.memfd = memfd
        self.ram = mmap.mmap(memfd, self.config.memory, flags=mmap.MAP_SHARED,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.ram)
        self._ram_addr = int(ffi.cast("uintptr_t", ffi.from_buffer(self.ram)))

    @property
    def mailbox(self) -> guest.Mailbox:
        return guest.Mailbox(self.view)

    # --- KVM ------------------------------------------------------------------------------------

    def _create_kvm(self) -> None:
        self.kvm = Kvm(self.host)
        self.vmfd = self.kvm.create_vm()
        if self.vmfd.check_extension(KVM_CAP_EXIT_ON_EMULATION_FAILURE):
            # Emulation failures come with the instruction bytes (MOVDIR64B).
            self.vmfd.enable_cap(KVM_CAP_EXIT_ON_EMULATION_FAILURE, 1)
        for slot, (gpa, off, length) in enumerate(guest.ram_ranges(self.config.memory)):
            self.vmfd.set_user_memory_region(slot, gpa, length, self._ram_addr + off)
        self.vcpus = [self.vmfd.create_vcpu(i) for i in range(self.config.vcpus)]
        for vcpu in self.vcpus:
            setup_cpuid(vcpu)  # before any KVM_SET_SREGS: standard KVM checks long mode against it

    def _boot_vcpus(self) -> None:
        # The firmware touches only low RAM (its DMA area is below 3 GiB) and
        # the MMIO hole: map [0, 4 GiB), which leaves the tables below the
        # mailbox whatever the RAM size.  RAM above 4 GiB is the device's
        # (through the IOMMU, IOVA = GPA), not the firmware's.
        top = guest.MMIO_END
        assert guest.PAGE_TABLES_GPA + page_table_bytes(top) <= guest.MAILBOX_GPA
        cr3 = identity_page_tables(self.view, guest.PAGE_TABLES_GPA, top,
                                   uncached=((guest.MMIO_START, guest.MMIO_END),))
        for vcpu in self.vcpus:
            sregs = vcpu.get_sregs()
            setup_long_mode(sregs, cr3, cpl=3)
            vcpu.set_sregs(sregs)
            regs = vcpu.get_regs()
            regs.rip, regs.rflags = guest.FIRMWARE_GPA, user_rflags()
            regs.rsp = guest.STACK_TOP - 0x10000 * vcpu.id - 8
            regs.rdi = vcpu.id
            vcpu.set_regs(regs)

    # --- the device ---------------------------------------------------------------------------------

    def _open_device(self) -> None:
        names = [self.config.device] if self.config.device != "auto" else self.host.listdir("/sys/bus/pci/devices")
        last: OSError | None = None
        for bdf in names:
            dev = None
            try:
                dev = VfioDevice.open_bdf(self.host, bdf)
                self.dev_id = dev.bind_iommufd(self.iommufd)
            except OSError as e:
                last = e
                if dev is not None:
                    dev.close()
                continue
            self.dev, self.bdf = dev, bdf
            return
        if last is not None and last.errno in (errno.EINVAL, errno.EBUSY) and self.config.device == "auto":
            raise OSError(errno.EBUSY, f"every DSA of the host is passed through to another VM "
                                       f"({', '.join(names)}): start the host with more --devices") from None
        raise last or OSError(errno.ENODEV, "no device to pass through")

    def _setup_iommu(self) -> None:
        self.iommufd = IommuFd.open(self.host)
        self.ioas = self.iommufd.ioas_alloc()
        for gpa, off, length in guest.ram_ranges(self.config.memory):
            self.iommufd.ioas_map_file(self.ioas, self.memfd, off, length, iova=gpa)

    def _arm_msix(self) -> None:
        if not self.eventfds:
            self.eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(MSIX_VECTORS)]
        self.dev.enable_msix(self.eventfds)
        self.msix_armed = True

    def _disarm_msix(self) -> None:
        if self.msix_armed:
            self.dev.disable_irqs()
            self.msix_armed = False

    def _ensure_bus_master(self) -> bool:
        """The guest's driver enabled Bus Master Enable before the update, and a
        preserved device keeps it -- unless the new kernel cleared it, which
        stops its DMA.  Put the guest's configuration back; True if it was needed."""
        command = struct.unpack("<H", self.dev.config_read(PCI_COMMAND, 2))[0]
        if command & PCI_COMMAND_MASTER:
            return False
        self.dev.config_write(PCI_COMMAND, struct.pack("<H", command | PCI_COMMAND_MASTER))
        return True

    def device_enabled(self) -> bool:
        """GENSTS says enabled: a device reset by the kernel (reset-on-freeze) is not."""
        return self.dev.read32(VFIO_PCI_BAR0_REGION_INDEX, IDXD_GENSTATS_OFFSET) & 3 == IDXD_DEVICE_STATE_ENABLED

    def count_interrupts(self) -> int:
        for fd in self.eventfds:
            try:
                self.interrupts += os.eventfd_read(fd)
            except BlockingIOError:
                pass
        return self.interrupts

    # --- cold boot ------------------------------------------------------------------------------------

    def cold_boot(self) -> None:
        cfg = self.config
        self._map_ram(sealed_memfd(f"luvmm-{cfg.name}-ram", cfg.memory))
        self._setup_iommu()
        self._open_device()
        self.hwpt = self.iommufd.hwpt_alloc(self.dev_id, self.ioas)
        self.dev.attach_pt(self.hwpt)
        # The VMM is the guest's firmware as far as PCI goes: it enables the device.
        self.dev.config_write(PCI_COMMAND, struct.pack(
            "<H", PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE))
        self._arm_msix()
        guest.load_firmware(self.view, slots=cfg.slots, pairs=cfg.pairs, xfer=cfg.xfer)
        if cfg.guest == "firmware":
            self._create_kvm()
            self._boot_vcpus()
        else:
            self.vcpus = [_synthetic()(self)]
        self.start_vcpus()

    # --- vCPU threads -----------------------------------------------------------------------------------

    def start_vcpus(self) -> None:
        for vcpu in self.vcpus:
            done = _thread.allocate_lock()
            done.acquire()
            self._threads.append(done)
            _thread.start_new_thread(self._vcpu_thread, (vcpu, done))

    def _vcpu_thread(self, vcpu, done) -> None:
        try:
            self._vcpu_loop(vcpu)
        finally:
            done.release()

    def _vcpu_loop(self, vcpu) -> None:
        if _is_synthetic(vcpu):
            return self._synthetic_loop(vcpu)
        while True:
            if (self._pause or self._stop) and not self._park():
                return
            try:
                reason = vcpu.run()
            except OSError as e:
                self._crashed(vcpu, f"KVM_RUN failed: {e}")
                return
            if reason == KVM_EXIT_MMIO:
                self._mmio(vcpu)
            elif reason == KVM_EXIT_INTR:
                continue
            elif reason == KVM_EXIT_IO:
                continue  # no port devices: writes are ignored, reads return what is there
            elif reason == KVM_EXIT_INTERNAL_ERROR and self._emulate(vcpu):
                continue
            elif reason in (KVM_EXIT_HLT, KVM_EXIT_SHUTDOWN, KVM_EXIT_FAIL_ENTRY, KVM_EXIT_INTERNAL_ERROR):
                self._crashed(vcpu, KVM_EXIT_NAMES.get(reason, str(reason)))
                return
            else:
                self._crashed(vcpu, f"unexpected exit {KVM_EXIT_NAMES.get(reason, reason)}")
                return

    def _park(self) -> bool:
        """Park this vCPU thread while the VM is paused; False when it must stop."""
        with self._cond:
            if self._stop:
                return False
            if self._pause:
                self._parked += 1
                self.last_stop = max(self.last_stop, time.time())
                self._cond.notify_all()
                self._cond.wait_for(lambda: not self._pause or self._stop)
                self._parked -= 1
                if self._stop:
                    return False
                if not self.first_run:
                    self.first_run = time.time()
        return True

    def _synthetic_loop(self, cpu) -> None:
        while True:
            if (self._pause or self._stop) and not self._park():
                return
            try:
                cpu.step()
            except OSError as e:
                self._crashed(cpu, f"device access failed: {e}")
                return

    def _crashed(self, vcpu, reason: str) -> None:
        try:
            rip = vcpu.get_regs().rip if not _is_synthetic(vcpu) else 0
        except OSError:
            rip = 0
        with self._cond:
            self.crash = self.crash or GuestCrash(vcpu.id, reason, rip)
            self._parked += 1  # a stopped vCPU counts as parked for pause()
            self._cond.notify_all()

    def _mmio(self, vcpu) -> None:
        mmio = vcpu.kvm_run.mmio
        addr, length, write = mmio.phys_addr, mmio.len, mmio.is_write
        if guest.BAR0_GPA <= addr < guest.BAR0_GPA + BAR0_SIZE:
            off = addr - guest.BAR0_GPA
            if write:
                self.dev.region_write(VFIO_PCI_BAR0_REGION_INDEX, off, bytes(mmio.data)[:length])
            else:
                ffi.memmove(mmio.data, self.dev.region_read(VFIO_PCI_BAR0_REGION_INDEX, off, length), length)
        elif guest.BAR2_GPA <= addr < guest.BAR2_GPA + BAR2_SIZE:
            if write:
                self._portal_store(vcpu.id, addr - guest.BAR2_GPA, bytes(mmio.data)[:length])
            else:
                ffi.memmove(mmio.data, bytes(length), length)
        else:
            self.mmio_unhandled += 1
            if not write:
                ffi.memmove(mmio.data, b"\xff" * length, length)

    def _emulate(self, vcpu) -> bool:
        """What KVM could not emulate and the VMM can: MOVDIR64B to a portal."""
        failure = vcpu.kvm_run.emulation_failure
        if failure.suberror != KVM_INTERNAL_ERROR_EMULATION or \
                not failure.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
            return False
        regs = vcpu.get_regs()
        try:
            dest, src, length = movdir64b.decode(bytes(failure.insn_bytes)[:failure.insn_size], regs)
            src_gpa = movdir64b.translate(self.view, vcpu.get_sregs().cr3, src)
        except (movdir64b.NotMovdir64b, struct.error, IndexError):
            return False
        if not guest.BAR2_GPA <= dest < guest.BAR2_GPA + BAR2_SIZE or dest % 64:
            return False
        self.dev.region_write(VFIO_PCI_BAR2_REGION_INDEX, dest - guest.BAR2_GPA,
                              bytes(self.view[src_gpa:src_gpa + 64]))
        self.portal_writes += 1
        regs.rip += length
        vcpu.set_regs(regs)
        return True

    def _portal_store(self, vcpu_id: int, off: int, data: bytes) -> None:
        """Combine a guest's stores into whole 64-byte descriptors (what
        MOVDIR64B does in one go on real hardware)."""
        line = off & ~63
        buf, mask, base = self._portal.get(vcpu_id, (None, 0, -1))
        if base != line:
            buf, mask = bytearray(64), 0
        pos = off - line
        if pos + len(data) > 64:
            return  # a store across two portal lines: dropped, as the device would
        bits = ((1 << len(data)) - 1) << pos
        if mask & bits:  # a store to bytes already written: a new descriptor began
            buf, mask = bytearray(64), 0
        buf[pos:pos + len(data)] = data
        mask |= bits
        if mask == (1 << 64) - 1:
            self.dev.region_write(VFIO_PCI_BAR2_REGION_INDEX, line, bytes(buf))
            self.portal_writes += 1
            self._portal.pop(vcpu_id, None)
        else:
            self._portal[vcpu_id] = (buf, mask, line)

    def pause(self) -> float:
        """Stop every vCPU; returns when the last one has left KVM_RUN (that time)."""
        with self._cond:
            self._pause = True
            self.last_stop = 0.0
            for vcpu in self.vcpus:
                vcpu.kick()
            self._cond.wait_for(lambda: self._parked >= len(self.vcpus))
        return self.last_stop or time.time()

    def resume(self) -> float:
        with self._cond:
            self.first_run = 0.0
            self._pause = False
            now = time.time()
            self._cond.notify_all()
        return now

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._pause = False
            for vcpu in self.vcpus:
                vcpu.kick()
            self._cond.notify_all()
        for done in self._threads:
            if done.acquire(True, 5):
                done.release()

    # --- machine state ------------------------------------------------------------------------------

    def machine_state(self, phases: dict) -> dict:
        vcpus = []
        for vcpu in self.vcpus:
            if _is_synthetic(vcpu):
                vcpus.append({"id": vcpu.id, "synthetic": vcpu.save()})
                continue
            vcpus.append({"id": vcpu.id, "regs": bytes(ffi.buffer(vcpu.get_regs())).hex(),
                          "sregs": bytes(ffi.buffer(vcpu.get_sregs())).hex()})
        # The write-combining buffers: a pause can fall between the eight
        # stores of one descriptor, and the rest arrive after the restore.
        portal = {str(v): [buf.hex(), mask, line] for v, (buf, mask, line) in self._portal.items()}
        return {"config": self.config.to_dict(), "vcpus": vcpus, "portal": portal,
                "device": {"bdf": self.bdf, "ioas": self.ioas, "hwpt": self.hwpt, "msix": self.msix_armed},
                "phases": phases, "mailbox": self.mailbox.snapshot(), "interrupts": self.count_interrupts()}

    # --- live update: prepare, cancel ----------------------------------------------------------------

    def preserve(self, session) -> None:
        """Make sure the RAM, the iommufd (HWPT marked), the device and the
        state memfd are in the session (what is there already stays).

        The control plane does this as soon as the VM runs, not at prepare:
        LUO takes a file's contents at the reboot, not at PRESERVE_FD, so the
        guest runs on meanwhile -- and the session then always describes the
        VM, which is what a VMM restarted after a crash finds (:meth:`files`)."""
        if self.state_memfd < 0:
            self.state_memfd = sealed_memfd(f"luvmm-{self.config.name}-state", machine_state.STATE_MEMFD_SIZE)
        for what, token, fd in (("device", DEVICE_TOKEN, self.dev.fd), ("iommufd", IOMMUFD_TOKEN, self.iommufd.fd),
                                ("ram", RAM_TOKEN, self.memfd), ("state", STATE_TOKEN, self.state_memfd)):
            if what in self.preserved:
                continue
            if what == "iommufd":
                self.iommufd.hwpt_liveupdate_mark_preserve(self.hwpt, HWPT_TOKEN)
            session.preserve_fd(fd, token)
            self.preserved.add(what)

    def files(self) -> tuple[dict, dict[str, int]]:
        """(meta, {name: fd}) for the unit's fd store: what a VMM started
        after this one dies needs to pick the VM up (:meth:`recover`)."""
        meta = {"config": self.config.to_dict(), "bdf": self.bdf, "ioas": self.ioas, "hwpt": self.hwpt,
                "dev_id": self.dev_id, "preserved": sorted(self.preserved)}
        return meta, {"ram": self.memfd, "iommufd": self.iommufd.fd, "device": self.dev.fd,
                      "state": self.state_memfd}

    def leave_files(self) -> None:
        """Leave :meth:`files` in the unit's fd store: if this VMM dies, init
        starts the next one on them (liveupdate.fdstore).  Where there is no
        store (not started by such an init), a VMM that dies loses its VM:
        said, not fatal."""
        meta, files = self.files()
        try:
            fdstore.store(files, meta)
        except OSError as e:
            import sys

            print(f"vmm[{self.config.name}]: cannot leave the VM's files with init: {e.strerror or e}",
                  file=sys.stderr)

    def prepare(self, session) -> dict:
        """Pause and save the machine state into the state memfd (after making
        sure the files are in the session, which they normally already are).
        Returns the phase timestamps."""
        clock = Clock()
        clock.mark("prepare")
        self.preserve(session)
        clock.mark("preserved")
        clock.mark("pause_start")
        clock.mark("stopped", self.pause())
        mailbox_at_pause = self.mailbox.snapshot()
        inflight = guest.batches_in_flight(self.view)
        self._disarm_msix()  # kernels of the reset-on-freeze kind refuse the reboot otherwise
        state = self.machine_state(dict(clock.marks, mailbox_at_pause=mailbox_at_pause,
                                        inflight_at_pause={str(k): v for k, v in inflight.items()}))
        clock.mark("saved", machine_state.write(self.state_memfd, state))
        return clock.marks

    def cancel(self) -> float:
        """Rollback: the update did not happen; the VM runs on as it was."""
        self._arm_msix()
        return self.resume()

    # --- restore mode ---------------------------------------------------------------------------------

    @classmethod
    def restore(cls, host, session, clock: Clock) -> tuple[Vm, dict]:
        """Rebuild a VM from its session after a kexec and resume it; returns
        (vm, the machine state it was saved with)."""
        state_fd = session.retrieve_fd(STATE_TOKEN)
        state = machine_state.read(state_fd)
        clock.mark("retrieved")
        vm = cls(host, VmConfig.from_dict(state["config"]))
        vm.state_memfd = state_fd
        vm._map_ram(session.retrieve_fd(RAM_TOKEN))
        clock.mark("mapped")
        if vm.config.guest == "firmware":
            vm._create_kvm()
            for vcpu, saved in zip(vm.vcpus, state["vcpus"]):
                sregs = ffi.new("struct kvm_sregs *")
                ffi.memmove(sregs, bytes.fromhex(saved["sregs"]), ffi.sizeof(sregs[0]))
                vcpu.set_sregs(sregs)
                regs = ffi.new("struct kvm_regs *")
                ffi.memmove(regs, bytes.fromhex(saved["regs"]), ffi.sizeof(regs[0]))
                vcpu.set_regs(regs)
        else:
            cpu = _synthetic()(vm)
            cpu.restore(state["vcpus"][0]["synthetic"])
            vm.vcpus = [cpu]
        clock.mark("vcpus_restored")
        wiring = state["device"]
        vm.iommufd = IommuFd(host, session.retrieve_fd(IOMMUFD_TOKEN))
        vm.dev = VfioDevice(host, session.retrieve_fd(DEVICE_TOKEN))
        vm.bdf, vm.ioas, vm.hwpt = wiring["bdf"], wiring["ioas"], wiring["hwpt"]
        vm._portal = {int(v): (bytearray.fromhex(buf), mask, line)
                      for v, (buf, mask, line) in state.get("portal", {}).items()}
        vm.dev_id = vm.dev.bind_iommufd(vm.iommufd)
        vm.dev.attach_pt(vm.hwpt)
        vm._arm_msix()
        vm.bus_master_restored = vm._ensure_bus_master()
        clock.mark("device_reattached")
        machine_state.mark_resumed(state_fd)
        vm._pause = True
        vm.start_vcpus()
        clock.mark("resumed", vm.resume())
        return vm, state

    @classmethod
    def recover(cls, host, meta: dict, fds: dict[str, int], clock: Clock) -> Vm:
        """Start a VM again on the RAM, iommufd and device that a VMM which
        died left in its unit's fd store (:meth:`files`).

        The device kept running, and its DMA with it.  The vCPUs' registers
        died with that VMM, so vCPU 0 enters the firmware at _start again with
        init_device = 0: the firmware keeps everything it knows in guest RAM
        and recovers (vmm/firmware/fw.c), its counters going on from where
        they were."""
        config = VmConfig.from_dict(meta["config"])
        if config.guest != "firmware":
            for fd in fds.values():
                os.close(fd)
            raise OSError(errno.EOPNOTSUPP, "the synthetic guest keeps its state in the VMM: "
                                            "it cannot be restarted on its RAM")
        vm = cls(host, config)
        vm.state_memfd = fds["state"]
        vm._map_ram(fds["ram"])
        vm.iommufd = IommuFd(host, fds["iommufd"])
        vm.dev = VfioDevice(host, fds["device"])
        vm.bdf, vm.ioas, vm.hwpt, vm.dev_id = meta["bdf"], meta["ioas"], meta["hwpt"], meta["dev_id"]
        vm.preserved = set(meta["preserved"])
        vm._arm_msix()
        vm.mailbox["init_device"] = 0
        vm._create_kvm()
        vm._boot_vcpus()
        vm.start_vcpus()
        clock.mark("recovered")
        return vm

    def close(self) -> None:
        self.stop()
        for vcpu in self.vcpus:
            vcpu.close()
        for fd in self.eventfds:
            os.close(fd)
        self.eventfds = []
