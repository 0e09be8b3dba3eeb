"""The passed-through PCI function: its VFIO cdev bound to an iommufd whose
IOAS maps guest RAM at IOVA = GPA and whose HWPT the device is attached to;
its MSI-X vectors (a DSA's) or its MSI vector (QEMU's edu, the lab's
device) on eventfds; its BARs in guest-physical space (vmm/bars.py: what
VFIO lets the VMM mmap is mapped into the guest, the rest traps and is
served by the vCPU run loop in C).  Which device it is, the function's own
vendor and device IDs say (``kind``).

What still comes back to this module's Python is rare: the virtual MSI-X
table, a read of a trapped register on the emulated host (it needs its
socket's reply), an access outside every BAR, any access to a test's
stand-in device (no fd the run loop could use).  The run loop's
write-combining buffers are part of the machine state: a pause may fall
between two stores of a descriptor.
"""

from __future__ import annotations

import errno
import os
import struct

from luvmm.devices.dsa_regs import IDXD_DEVICE_STATE_ENABLED, IDXD_GENSTATS_OFFSET
from luvmm.devices.iommufd import IommuFd
from luvmm.devices.vfio import RegionInfo, VfioDevice
from luvmm.abi import ffi
from luvmm.devices.edu_regs import PCI_DEVICE_ID_EDU, PCI_VENDOR_ID_QEMU
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
from luvmm.vmm import bars, guest
from luvmm.vmm.machine_state import DeviceWiring

MSIX_VECTORS = 9
#: The kinds of device a guest here drives: (vendor, device) -> kind.
KINDS = {(PCI_VENDOR_ID_QEMU, PCI_DEVICE_ID_EDU): "edu"}
#: Each kind's BARs in the guest: (name, BAR index, GPA, portals?).  Each
#: BAR's room ends where the next one (or the MMIO window) starts.
GUEST_BARS = {"dsa": (("bar0", VFIO_PCI_BAR0_REGION_INDEX, guest.BAR0_GPA, False),
                      ("portals", VFIO_PCI_BAR2_REGION_INDEX, guest.BAR2_GPA, True)),
              "edu": (("bar0", VFIO_PCI_BAR0_REGION_INDEX, guest.BAR0_GPA, False),)}


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
        self._config = b""  # the config space header, as _identify read it
        self.mmio_unhandled = 0
        #: Set at restore: vCPU id -> (64-byte buffer, mask of the bytes written,
        #: portal line), for the run loops (which hold them while the guest runs).
        self.portal: dict[int, tuple[bytearray, int, int]] = {}
        #: The BARs as the guest sees them (bars.GuestBar), once the device is open.
        self.bars: list[bars.GuestBar] = []
        self.msix_table: bars.MsixTable | None = None
        self.maps = bars.BarMaps()
        #: The vCPUs' run loops (luvmm.vmm.runloop.RunLoop), which serve the traps.
        self.loops: list = []
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
        """The kind of device (KINDS), from its config space's header -- read
        whole, once, and kept for plan_bars (its capabilities): on the
        emulated host each read is a round trip on the restore's path."""
        self._config = self.dev.config_read(0, 256)
        vendor, device = struct.unpack_from("<HH", self._config, PCI_VENDOR_ID)
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
            self.plan_bars()
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
        self.plan_bars()
        self.arm_msix()
        self.bus_master_restored = self.ensure_bus_master()

    def adopt(self, iommufd_fd: int, device_fd: int, wiring: DeviceWiring) -> None:
        """A VMM started after one died: its files, still bound and attached."""
        self.iommufd = IommuFd(self.host, iommufd_fd)
        self.dev = VfioDevice(self.host, device_fd)
        self.bdf, self.ioas, self.hwpt, self.dev_id = wiring.bdf, wiring.ioas, wiring.hwpt, wiring.dev_id
        self.kind = self._identify()
        self.plan_bars()
        self.arm_msix()

    # --- the BARs in guest-physical space ----------------------------------------------------------

    def plan_bars(self) -> None:
        """What of each BAR is mapped into the guest and what traps
        (vmm/bars.py), from what VFIO says of the device's regions."""
        room = {guest.BAR0_GPA: guest.BAR2_GPA - guest.BAR0_GPA, guest.BAR2_GPA: guest.MMIO_END - guest.BAR2_GPA}
        planned = []
        for name, index, gpa, portal in GUEST_BARS[self.kind]:
            region = self._region_info(index)
            if not region.size or region.size > room[gpa]:
                raise OSError(errno.ENODEV, f"{self.bdf}: BAR{index} of {region.size:#x} bytes does not fit the "
                                            f"guest's {room[gpa]:#x} at {gpa:#x}")
            planned.append(bars.GuestBar(name, index, gpa, region, portal))
        msix = bars.find_msix(self._config) if self.kind == "dsa" else None
        fd = getattr(self.dev, "fd", -1)
        self.msix_table = bars.plan(planned, msix, fd=fd, access=self.host.region_access(fd) if fd >= 0 else ("", 0))
        self.bars = planned

    def _region_info(self, index: int) -> RegionInfo:
        return self.dev.region_info(index)  # a VfioDevice; a test's stand-in says the same of itself

    def map_bars(self, vmfd) -> None:
        """mmap each mappable area from the device fd and give it to ``vmfd``
        (a new KVM VM: a cold boot's, a restore's) as a memory slot."""
        self.maps.close()
        self.maps.install(self.host, vmfd, self.dev.fd, self.bars)

    def traps(self) -> list:
        """What the vCPU run loops serve, in the order they try them."""
        return [trap for bar in self.bars for trap in bar.traps]

    def guest_path(self) -> list[dict]:
        """Each BAR: what is mapped, what traps and how (vm status)."""
        return [bar.describe() for bar in self.bars]

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
        """Interrupts the device raised: read from its eventfds here, and
        those the run loops took while their guest waited for one."""
        for fd in self.eventfds:
            try:
                self.interrupts += os.eventfd_read(fd)
            except BlockingIOError:
                pass
        return self.interrupts + sum(loop.interrupts for loop in self.loops)

    @property
    def portal_writes(self) -> int:
        """Whole descriptors the guest wrote to a trapped portal (the run loops combine them)."""
        return sum(loop.portal_writes for loop in self.loops)

    # --- the guest's accesses -----------------------------------------------------------------------

    def mmio(self, vcpu_id: int, addr: int, length: int, is_write: bool, data) -> None:
        """A guest access the run loop handed back (``data`` is the exit's
        buffer: what to write, or where the read goes): the virtual MSI-X
        table; a BAR the loop cannot reach (a read on the emulated host, a
        stand-in device); or an address outside every BAR."""
        for bar in self.bars:
            if not bar.gpa <= addr < bar.gpa + bar.size:
                continue
            off = addr - bar.gpa
            table = next((t for t in bar.traps if t.name == "msix-table"), None)
            if table is not None and table.gpa <= addr < table.gpa + table.size:
                if is_write:
                    self.msix_table.write(addr - table.gpa, bytes(ffi.buffer(data, length)))
                else:
                    ffi.memmove(data, self.msix_table.read(addr - table.gpa, length), length)
            elif bar.portal and not is_write:
                ffi.memmove(data, bytes(length), length)  # portals read as zero
            elif is_write:
                self.dev.region_write(bar.index, off, bytes(ffi.buffer(data, length)))
            else:
                ffi.memmove(data, self.dev.region_read(bar.index, off, length), length)
            return
        self.mmio_unhandled += 1
        if not is_write:
            ffi.memmove(data, b"\xff" * length, length)

    def portal_state(self) -> dict:
        """The write-combining buffers (machine state): the run loops', or this module's."""
        state = {str(v): [buf.hex(), mask, line] for v, (buf, mask, line) in self.portal.items()}
        for vcpu_id, loop in enumerate(self.loops):
            held = loop.portal_state()
            if held is not None:
                state[str(vcpu_id)] = [held[0].hex(), held[1], held[2]]
        return state

    def close(self) -> None:
        self.maps.close()
        for fd in self.eventfds:
            os.close(fd)
        self.eventfds = []
