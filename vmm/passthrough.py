"""The passed-through PCI function: its VFIO cdev bound to an iommufd whose
IOAS maps guest RAM at IOVA = GPA and whose HWPT the device is attached to;
its MSI-X vectors (a DSA's) or its MSI vector (QEMU's edu, the lab's
device) on eventfds; its BARs in guest-physical space.  Which of the two
it is, the function's own vendor and device IDs say (``kind``).

A guest's MMIO exits on BAR0 become region reads and writes; on BAR2 (the
DSA's portals) the eight 8-byte stores of one descriptor are combined into a
single 64-byte write, as MOVDIR64B does in one go on real hardware (and a
MOVDIR64B that KVM could not emulate is done here).  The write-combining
buffers are part of the machine state: a pause may fall between two stores.
"""

from __future__ import annotations

import errno
import os
import struct

from devices.dsa_regs import IDXD_DEVICE_STATE_ENABLED, IDXD_GENSTATS_OFFSET
from devices.iommufd import IommuFd
from devices.vfio import VfioDevice
from luvmm.abi import ffi
from devices.edu_regs import EDU_BAR_SIZE, PCI_DEVICE_ID_EDU, PCI_VENDOR_ID_QEMU
from luvmm.uapi.pci_regs import (
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_VENDOR_ID,
)
from luvmm.uapi.vfio import (
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_BAR2_REGION_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX,
)
from vmm import guest, movdir64b
from vmm.machine_state import DeviceWiring

BAR0_SIZE, BAR2_SIZE = 64 << 10, 128 << 10
MSIX_VECTORS = 9
#: The kinds of device a guest here drives: (vendor, device) -> kind.
KINDS = {(PCI_VENDOR_ID_QEMU, PCI_DEVICE_ID_EDU): "edu"}


class Passthrough:
    def __init__(self, host):
        self.host = host
        self.iommufd: IommuFd | None = None
        self.dev: VfioDevice | None = None
        self.bdf = ""
        self.ioas = self.hwpt = self.dev_id = 0
        self.eventfds: list[int] = []
        self.msix_armed = False
        self.interrupts = 0
        self.portal_writes = 0
        self.mmio_unhandled = 0
        #: vCPU id -> (64-byte buffer, mask of the bytes written, portal line)
        self.portal: dict[int, tuple[bytearray, int, int]] = {}
        #: After a restore: the device came back with Bus Master Enable clear, and the VMM set it again.
        self.bus_master_restored = False
        #: "dsa" or "edu" (KINDS): what the function's IDs say it is.
        self.kind = "dsa"
        #: After a restore: the kernel did not preserve the device; it was opened again, reset.
        self.was_reset = False

    # --- wiring ---------------------------------------------------------------------------------

    def wire(self, memory, device: str) -> None:
        """A cold boot: an iommufd and IOAS mapping guest RAM, the device
        (``device``: a BDF, or "auto": the first free one) bound and attached
        to a HWPT, enabled as the guest's firmware would, MSI-X armed."""
        self.iommufd = IommuFd.open(self.host)
        self.ioas = self.iommufd.ioas_alloc()
        memory.map_into_ioas(self.iommufd, self.ioas)
        self._open(device)
        self.hwpt = self.iommufd.hwpt_alloc(self.dev_id, self.ioas)
        self.dev.attach_pt(self.hwpt)
        self.dev.config_write(PCI_COMMAND, struct.pack(
            "<H", PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE))
        self.arm_msix()

    def rewire(self, memory, wiring: DeviceWiring) -> None:
        """After a kexec whose kernel did not preserve the device (mainline
        preserves memfds only): wire it anew, as a cold boot does, on the
        preserved RAM -- a new iommufd and IOAS mapping the RAM memfd, the
        same function opened by its BDF, bound, attached, enabled.  The
        device comes back reset: its guest's driver starts again on it."""
        self.wire(memory, wiring.bdf)
        self.was_reset = True

    def _identify(self) -> str:
        vendor, device = struct.unpack("<HH", self.dev.config_read(PCI_VENDOR_ID, 4))
        return KINDS.get((vendor, device), "dsa")

    def _open(self, device: str) -> None:
        names = [device] if device != "auto" else self.host.listdir("/sys/bus/pci/devices")
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
            self.kind = self._identify()
            return
        if last is not None and last.errno in (errno.EINVAL, errno.EBUSY) and device == "auto":
            raise OSError(errno.EBUSY, f"every DSA of the host is passed through to another VM "
                                       f"({', '.join(names)}): start the host with more --devices") from None
        raise last or OSError(errno.ENODEV, "no device to pass through")

    def reattach(self, iommufd_fd: int, device_fd: int, wiring: DeviceWiring) -> None:
        """After a kexec: the retrieved iommufd (its IOAS and HWPT preserved)
        and device fd -- a fresh cdev fd, bound again and attached again."""
        self.iommufd = IommuFd(self.host, iommufd_fd)
        self.dev = VfioDevice(self.host, device_fd)
        self.bdf, self.ioas, self.hwpt = wiring.bdf, wiring.ioas, wiring.hwpt
        self.dev_id = self.dev.bind_iommufd(self.iommufd)
        self.dev.attach_pt(self.hwpt)
        self.kind = self._identify()
        self.arm_msix()
        self.bus_master_restored = self.ensure_bus_master()

    def adopt(self, iommufd_fd: int, device_fd: int, wiring: DeviceWiring) -> None:
        """A VMM started after one died: its files, still bound and attached."""
        self.iommufd = IommuFd(self.host, iommufd_fd)
        self.dev = VfioDevice(self.host, device_fd)
        self.bdf, self.ioas, self.hwpt, self.dev_id = wiring.bdf, wiring.ioas, wiring.hwpt, wiring.dev_id
        self.kind = self._identify()
        self.arm_msix()

    def wiring(self) -> DeviceWiring:
        return DeviceWiring(self.bdf, self.ioas, self.hwpt, self.dev_id, self.msix_armed)

    # --- interrupts and the command register ----------------------------------------------------

    def arm_msix(self) -> None:
        """The device's interrupts on eventfds: a DSA's MSI-X vectors, edu's one MSI vector."""
        edu = self.kind == "edu"
        if not self.eventfds:
            self.eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(1 if edu else MSIX_VECTORS)]
        if edu:
            self.dev.set_irqs(VFIO_PCI_MSI_IRQ_INDEX, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, 0, 1,
                              struct.pack("=i", self.eventfds[0]))
        else:
            self.dev.enable_msix(self.eventfds)
        self.msix_armed = True

    def disarm_msix(self) -> None:
        if self.msix_armed:
            if self.kind == "edu":
                self.dev.disable_irqs(VFIO_PCI_MSI_IRQ_INDEX)
            else:
                self.dev.disable_irqs()
            self.msix_armed = False

    def irq_fd(self) -> int | None:
        """The eventfd of the device's first vector (edu's only one), or None."""
        return self.eventfds[0] if self.eventfds else None

    def wait_interrupt(self, timeout: float, wake_fd: int | None = None) -> bool:
        """Wait at most ``timeout`` for the device's interrupt (its first
        vector; or ``wake_fd``, a kick); True if it came, counted."""
        fds = [fd for fd in (self.irq_fd(), wake_fd) if fd is not None and fd >= 0]
        if not fds:
            return False
        import select  # only an edu driver waits: not on a DSA guest's restore path

        came = False
        ready, _, _ = select.select(fds, [], [], timeout)
        for fd in ready:
            try:
                n = os.eventfd_read(fd)
            except BlockingIOError:
                continue
            if fd != wake_fd:
                self.interrupts += n
                came = True
        return came

    def ensure_bus_master(self) -> bool:
        """The guest's driver enabled Bus Master Enable before the update, and a
        preserved device keeps it -- unless the new kernel cleared it, which
        stops its DMA.  Put the guest's configuration back; True if it was needed."""
        command = struct.unpack("<H", self.dev.config_read(PCI_COMMAND, 2))[0]
        if command & PCI_COMMAND_MASTER:
            return False
        self.dev.config_write(PCI_COMMAND, struct.pack("<H", command | PCI_COMMAND_MASTER))
        return True

    def enabled(self) -> bool:
        """Whether the device came through the update as the guest left it:
        not opened again after a kernel that did not preserve it, and (a
        DSA) GENSTS says enabled -- a device reset by the kernel
        (reset-on-freeze) is not."""
        if self.was_reset:
            return False
        if self.kind == "edu":
            return True
        return self.dev.read32(VFIO_PCI_BAR0_REGION_INDEX, IDXD_GENSTATS_OFFSET) & 3 == IDXD_DEVICE_STATE_ENABLED

    def count_interrupts(self) -> int:
        for fd in self.eventfds:
            try:
                self.interrupts += os.eventfd_read(fd)
            except BlockingIOError:
                pass
        return self.interrupts

    # --- the guest's accesses -----------------------------------------------------------------------

    def mmio(self, vcpu_id: int, addr: int, length: int, is_write: bool, data) -> None:
        """A guest access to guest-physical ``addr`` (a KVM MMIO exit; ``data``
        is the exit's buffer: what to write, or where the read goes)."""
        bar0 = EDU_BAR_SIZE if self.kind == "edu" else BAR0_SIZE
        if guest.BAR0_GPA <= addr < guest.BAR0_GPA + bar0:
            off = addr - guest.BAR0_GPA
            if is_write:
                self.dev.region_write(VFIO_PCI_BAR0_REGION_INDEX, off, bytes(data)[:length])
            else:
                ffi.memmove(data, self.dev.region_read(VFIO_PCI_BAR0_REGION_INDEX, off, length), length)
        elif self.kind == "dsa" and guest.BAR2_GPA <= addr < guest.BAR2_GPA + BAR2_SIZE:
            if is_write:
                self.portal_store(vcpu_id, addr - guest.BAR2_GPA, bytes(data)[:length])
            else:
                ffi.memmove(data, bytes(length), length)
        else:
            self.mmio_unhandled += 1
            if not is_write:
                ffi.memmove(data, b"\xff" * length, length)

    def portal_store(self, vcpu_id: int, off: int, data: bytes) -> None:
        """Combine a guest's stores into whole 64-byte descriptors."""
        line = off & ~63
        buf, mask, base = self.portal.get(vcpu_id, (None, 0, -1))
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
            self.portal.pop(vcpu_id, None)
        else:
            self.portal[vcpu_id] = (buf, mask, line)

    def movdir64b(self, vcpu, insn: bytes, view) -> bool:
        """A MOVDIR64B to a portal that KVM could not emulate: do it (64 bytes
        from guest memory in one portal write) and step over it; False if it
        is not one."""
        regs = vcpu.get_regs()
        try:
            dest, src, length = movdir64b.decode(insn, regs)
            src_gpa = movdir64b.translate(view, vcpu.get_sregs().cr3, src)
        except (movdir64b.NotMovdir64b, struct.error, IndexError):
            return False
        if not guest.BAR2_GPA <= dest < guest.BAR2_GPA + BAR2_SIZE or dest % 64:
            return False
        self.dev.region_write(VFIO_PCI_BAR2_REGION_INDEX, dest - guest.BAR2_GPA, bytes(view[src_gpa:src_gpa + 64]))
        self.portal_writes += 1
        regs.rip += length
        vcpu.set_regs(regs)
        return True

    def portal_state(self) -> dict:
        return {str(v): [buf.hex(), mask, line] for v, (buf, mask, line) in self.portal.items()}

    def close(self) -> None:
        for fd in self.eventfds:
            os.close(fd)
        self.eventfds = []
