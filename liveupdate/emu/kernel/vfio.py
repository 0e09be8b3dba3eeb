"""vfio-pci through the device cdev (drivers/vfio/pci), emulated, with live-update
preservation as the seed RFC "vfio/pci: live update support" describes.

A cdev fd can do nothing but VFIO_DEVICE_BIND_IOMMUFD until it is bound
(EINVAL), like the kernel's.  Config space is virtualised as vfio-pci does:
BARs and the MSI-X capability are virtual, the command register's Memory,
Bus Master and INTx-disable bits reach the hardware; MSI-X vectors are
programmed through VFIO_DEVICE_SET_IRQS with eventfds.  Closing the last fd
of a device disables it (reset, Bus Master Enable off), as vfio-pci does.

Live update, by kernel profile:

* ``continuous-dma`` (the seed's goal): a preserved device is not reset and
  keeps Bus Master Enable across the kexec; its virtual config space goes to
  KHO and comes back; interrupts are disabled at freeze and re-armed by
  userspace after the restore (and re-enabled if the update is cancelled).
* ``reset-on-freeze`` (the current upstream series): userspace must disable
  interrupts itself before the reboot (else it fails with EINVAL), and the
  device is reset at freeze, so DMA stops.

In both, state-changing ioctls and config writes on a preserved device are
EBUSY; after the kexec, opening the cdev of a preserved device that was not
retrieved yet is EBUSY; FINISH is EBUSY until the device was retrieved and
bound to an iommufd.

Why this long: it mirrors one kernel subsystem, vfio-pci's cdev with its live-
update handler, rule for rule and errno for errno; the kernel's own files are
longer.
"""

from __future__ import annotations

import errno
import os
import struct

from luvmm.liveupdate.emu.kernel.iommufd import IommufdFile
from luvmm.devices.emu.pci import MSIX_CAP_OFFSET, PCIE_CAP_OFFSET
from luvmm.uapi.pci_regs import (
    PCI_CAP_ID_EXP,
    PCI_CAP_ID_MSI,
    PCI_CAP_ID_MSIX,
    PCI_CAPABILITY_LIST,
    PCI_INTERRUPT_PIN,
    PCI_MSI_FLAGS,
    PCI_MSI_FLAGS_QMASK,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_EXP_DEVCTL,
)
from luvmm.uapi.vfio import (
    VFIO_DEVICE_ATTACH_IOMMUFD_PT,
    VFIO_DEVICE_BIND_FLAG_TOKEN,
    VFIO_DEVICE_BIND_IOMMUFD,
    VFIO_DEVICE_DETACH_IOMMUFD_PT,
    VFIO_DEVICE_FLAGS_PCI,
    VFIO_DEVICE_FLAGS_RESET,
    VFIO_DEVICE_GET_INFO,
    VFIO_DEVICE_GET_IRQ_INFO,
    VFIO_DEVICE_GET_REGION_INFO,
    VFIO_DEVICE_RESET,
    VFIO_DEVICE_SET_IRQS,
    VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_INFO_NORESIZE,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_TYPE_MASK,
    VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    VFIO_IRQ_SET_DATA_TYPE_MASK,
    VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_BAR2_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_ERR_IRQ_INDEX,
    VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_NUM_IRQS,
    VFIO_PCI_NUM_REGIONS,
    VFIO_PCI_OFFSET_SHIFT,
    VFIO_PCI_REQ_IRQ_INDEX,
    VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
)
from luvmm.liveupdate.emu.kernel.core import File, KernelError, RealFile, register_subsystem
from luvmm.liveupdate.emu.kernel.luo import FileHandler, LuoFile, register_file_handler

OFFSET_MASK = (1 << VFIO_PCI_OFFSET_SHIFT) - 1
PASSTHROUGH_COMMAND = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE
CONTINUOUS_DMA = "continuous-dma"
RESET_ON_FREEZE = "reset-on-freeze"


def _minsz(buf: bytearray, minsz: int) -> int:
    """VFIO's argsz convention: argsz below the minimum struct is EINVAL."""
    if len(buf) < 4:
        raise KernelError(errno.EFAULT)
    argsz = struct.unpack_from("<I", buf)[0]
    if argsz < minsz:
        raise KernelError(errno.EINVAL, f"argsz {argsz} < {minsz}")
    if argsz > len(buf):
        raise KernelError(errno.EFAULT)
    return argsz


class VfioPciDevice:
    """vfio-pci's per-device state in one kernel boot."""

    def __init__(self, index: int, hw):
        self.index = index
        self.hw = hw
        self.vconfig = bytearray(hw.cfg_read(0, 4096))
        self.bound_file: VfioDeviceFile | None = None
        self.preserved: LuoFile | None = None  # outgoing, this boot
        self.incoming: LuoFile | None = None  # from the previous boot, not yet retrieved
        self.msix: dict[int, RealFile] = {}  # vector -> the eventfd it signals
        self.frozen_msix: dict[int, RealFile] = {}

    @property
    def name(self) -> str:
        return f"vfio{self.index}"

    # --- interrupts ------------------------------------------------------------------------

    def wire(self, vector: int, eventfd: RealFile | None) -> None:
        old = self.msix.pop(vector, None)
        self.hw.msix.set_eventfd(vector, eventfd.fd if eventfd else None)
        self.hw.msix.set_masked(vector, eventfd is None)
        if old is not None and old is not eventfd:
            old.close()
        if eventfd is not None:
            self.msix[vector] = eventfd
        self._hw_msix_enable(bool(self.msix))

    def unwire_all(self, keep: bool = False) -> dict[int, RealFile]:
        """Disable every vector; returns the eventfds (closed unless ``keep``)."""
        taken = dict(self.msix)
        for vector in taken:
            self.hw.msix.set_eventfd(vector, None)
            self.hw.msix.set_masked(vector, True)
        self.msix.clear()
        self._hw_msix_enable(False)
        if not keep:
            for e in taken.values():
                e.close()
        return taken

    def _hw_msix_enable(self, on: bool) -> None:
        off = MSIX_CAP_OFFSET + PCI_MSIX_FLAGS
        flags = struct.unpack("<H", self.hw.cfg_read(off, 2))[0]
        flags = (flags | PCI_MSIX_FLAGS_ENABLE) if on else (flags & ~PCI_MSIX_FLAGS_ENABLE)
        self.hw.cfg_write(off, struct.pack("<H", flags))

    def cap(self, cap_id: int) -> int:
        """The offset of a standard capability in the function's config space, or 0."""
        cfg = self.hw.cfg_read(0, 256)
        if not struct.unpack_from("<H", cfg, PCI_STATUS)[0] & PCI_STATUS_CAP_LIST:
            return 0
        pos, seen = cfg[PCI_CAPABILITY_LIST] & ~3, set()
        while pos and pos not in seen:
            seen.add(pos)
            if cfg[pos] == cap_id:
                return pos
            pos = cfg[pos + 1] & ~3
        return 0

    def reset(self) -> None:
        """vfio_pci_ioctl_reset -> pci_try_reset_function: the PCI core saves
        the function's config space and MSI-X state, resets it and restores
        them (pci_dev_save_and_disable, pci_dev_restore): Memory and Bus
        Master enable, MSI-X enable and the vectors' eventfds are as before."""
        hw = self.hw
        with hw.lock:
            saved_cfg = hw.cfg_read(0, len(hw.config))
            saved_table = bytes(hw.msix.table)
        hw.flr()
        with hw.lock:
            hw.msix.table[:] = saved_table
        hw.cfg_write(0, saved_cfg)
        self.sync_command_from_hw()

    # --- virtual config space ----------------------------------------------------------------

    def config_write(self, offset: int, data: bytes) -> None:
        wmask = self.hw.wmask
        for i, byte in enumerate(data):
            pos = offset + i
            if PCIE_CAP_OFFSET + PCI_EXP_DEVCTL + 1 == pos:
                byte &= 0x7F  # FLR is VFIO_DEVICE_RESET's job
            self.vconfig[pos] = (self.vconfig[pos] & ~wmask[pos]) | (byte & wmask[pos])
        if offset < PCI_COMMAND + 2 and offset + len(data) > PCI_COMMAND:
            command = struct.unpack_from("<H", self.vconfig, PCI_COMMAND)[0]
            hw_command = struct.unpack("<H", self.hw.cfg_read(PCI_COMMAND, 2))[0]
            new = (hw_command & ~PASSTHROUGH_COMMAND) | (command & PASSTHROUGH_COMMAND)
            self.hw.cfg_write(PCI_COMMAND, struct.pack("<H", new))

    def sync_command_from_hw(self) -> None:
        hw_command = struct.unpack("<H", self.hw.cfg_read(PCI_COMMAND, 2))[0]
        command = struct.unpack_from("<H", self.vconfig, PCI_COMMAND)[0]
        struct.pack_into("<H", self.vconfig, PCI_COMMAND,
                         (command & ~PASSTHROUGH_COMMAND) | (hw_command & PASSTHROUGH_COMMAND))

    def disable(self) -> None:
        """vfio_pci_core_disable(): the last user is gone."""
        self.unwire_all()
        self.hw.attach_domain(None)
        self.hw.flr()
        self.vconfig[:] = self.hw.cfg_read(0, 4096)


class VfioDeviceFile(File):
    kind = "vfio-device"

    def __init__(self, kernel, dev: VfioPciDevice):
        super().__init__(kernel)
        self.dev = dev
        self.ictx: IommufdFile | None = None
        self.dev_id: int | None = None
        self.ictx_ref: int = -1

    def describe(self):
        return f"vfio-device:{self.dev.hw.bdf}" + (" (bound)" if self.ictx else "")

    @property
    def bound(self) -> bool:
        return self.ictx is not None

    def _busy_if_preserved(self) -> None:
        if self.dev.preserved is not None:
            raise KernelError(errno.EBUSY, f"{self.dev.hw.bdf} is preserved for a live update")

    def ioctl(self, request, definition, buf, fds, arg):
        if request == VFIO_DEVICE_BIND_IOMMUFD:
            return self._bind(buf, fds)
        if not self.bound:
            raise KernelError(errno.EINVAL, "bind the device to an iommufd first")
        if request == VFIO_DEVICE_GET_INFO:
            _minsz(buf, 16)
            struct.pack_into("<IIII", buf, 4, VFIO_DEVICE_FLAGS_RESET | VFIO_DEVICE_FLAGS_PCI,
                             VFIO_PCI_NUM_REGIONS, VFIO_PCI_NUM_IRQS, 0)
            return 0
        if request == VFIO_DEVICE_GET_REGION_INFO:
            _minsz(buf, 32)
            index = struct.unpack_from("<I", buf, 8)[0]
            if index >= VFIO_PCI_NUM_REGIONS:
                raise KernelError(errno.EINVAL)
            size = self._region_size(index)
            flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE if size else 0
            struct.pack_into("<IIIIQQ", buf, 0, struct.unpack_from("<I", buf)[0], flags, index, 0, size,
                             index << VFIO_PCI_OFFSET_SHIFT)
            return 0
        if request == VFIO_DEVICE_GET_IRQ_INFO:
            _minsz(buf, 16)
            index = struct.unpack_from("<I", buf, 8)[0]
            if index >= VFIO_PCI_NUM_IRQS:
                raise KernelError(errno.EINVAL)
            # vfio_pci_ioctl_get_irq_info: ERR exists on PCIe only; EVENTFD on every
            # index whatever its count; INTx MASKABLE|AUTOMASKED; NORESIZE on the
            # others but MSI-X where it can grow (has_dyn_msix: an MSI-X capability).
            if index == VFIO_PCI_ERR_IRQ_INDEX and not self.dev.cap(PCI_CAP_ID_EXP):
                raise KernelError(errno.EINVAL)
            count, flags = self._irq_count(index), VFIO_IRQ_INFO_EVENTFD
            if index == VFIO_PCI_INTX_IRQ_INDEX:
                flags |= VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED
            elif index != VFIO_PCI_MSIX_IRQ_INDEX or not self.dev.cap(PCI_CAP_ID_MSIX):
                flags |= VFIO_IRQ_INFO_NORESIZE
            struct.pack_into("<II", buf, 4, flags, index)
            struct.pack_into("<I", buf, 12, count)
            return 0
        if request == VFIO_DEVICE_SET_IRQS:
            return self._set_irqs(buf, fds)
        if request == VFIO_DEVICE_RESET:
            self._busy_if_preserved()
            self.dev.reset()
            return 0
        if request == VFIO_DEVICE_ATTACH_IOMMUFD_PT:
            _minsz(buf, 12)
            self._busy_if_preserved()
            flags, pt_id = struct.unpack_from("<II", buf, 4)
            if flags:
                raise KernelError(errno.EINVAL if flags & ~1 else errno.EOPNOTSUPP)
            hwpt_id = self.ictx.attach(self.dev_id, pt_id)
            self.dev.hw.attach_domain(self.ictx.domain_of(self.dev_id))
            struct.pack_into("<I", buf, 8, hwpt_id)
            return 0
        if request == VFIO_DEVICE_DETACH_IOMMUFD_PT:
            _minsz(buf, 8)
            self._busy_if_preserved()
            if struct.unpack_from("<I", buf, 4)[0]:
                raise KernelError(errno.EINVAL)
            bound = self.ictx.objects.get(self.dev_id)
            if bound is not None and bound.attached is not None:
                self.ictx.detach(bound)
            self.dev.hw.attach_domain(None)
            return 0
        raise KernelError(errno.ENOTTY)

    def _bind(self, buf, fds):
        # device_cdev.c vfio_df_ioctl_bind_iommufd: argsz, then a negative
        # iommufd or an unknown flag EINVAL, then one bind per fd (EINVAL), then
        # the token, then the fd lookup (EBADF, EBADFD).
        _minsz(buf, 16)
        flags, iommufd = struct.unpack_from("<Ii", buf, 4)
        if iommufd < 0 or flags & ~VFIO_DEVICE_BIND_FLAG_TOKEN:
            raise KernelError(errno.EINVAL, "negative iommufd or unknown bind flags")
        if self.bound:
            raise KernelError(errno.EINVAL, "already bound")
        if self.dev.bound_file is not None and self.dev.bound_file is not self \
                and self.kernel.alive(self.dev.bound_file):
            # vfio_df_open(): a cdev device is opened by one bind only.
            raise KernelError(errno.EINVAL, f"{self.dev.hw.bdf} is bound through another fd")
        if flags & VFIO_DEVICE_BIND_FLAG_TOKEN:
            raise KernelError(errno.EINVAL, "the emulated vfio-pci has no VF token")
        self._busy_if_preserved()
        if not fds:
            raise KernelError(errno.EBADF)
        ictx = self.kernel.lookup(fds[0])
        if not isinstance(ictx, IommufdFile):
            raise KernelError(errno.EBADFD, "not an iommufd")
        self.ictx = ictx
        self.ictx_ref = os.dup(fds[0])  # the binding holds the iommufd open
        self.dev_id = ictx.bind(self)
        self.dev.bound_file = self
        struct.pack_into("<I", buf, 12, self.dev_id)
        return 0

    def iommufd_gone(self) -> None:
        """The iommufd this device was bound to was released (not by us)."""
        self.dev.hw.attach_domain(None)

    def _region_size(self, index: int) -> int:
        bar = self.dev.hw.bars.get(index - VFIO_PCI_BAR0_REGION_INDEX) \
            if index <= VFIO_PCI_BAR2_REGION_INDEX + 3 else None
        if index == VFIO_PCI_CONFIG_REGION_INDEX:
            return 4096
        return bar.size if bar else 0

    def _irq_count(self, index: int) -> int:
        """vfio_pci_core.c vfio_pci_get_irq_count."""
        dev = self.dev
        if index == VFIO_PCI_INTX_IRQ_INDEX:
            return 1 if dev.vconfig[PCI_INTERRUPT_PIN] else 0
        if index == VFIO_PCI_MSI_IRQ_INDEX:
            pos = dev.cap(PCI_CAP_ID_MSI)
            if not pos:
                return 0
            flags = struct.unpack("<H", dev.hw.cfg_read(pos + PCI_MSI_FLAGS, 2))[0]
            return 1 << ((flags & PCI_MSI_FLAGS_QMASK) >> 1)
        if index == VFIO_PCI_MSIX_IRQ_INDEX:
            return dev.hw.msix.nvec if dev.cap(PCI_CAP_ID_MSIX) else 0
        if index == VFIO_PCI_ERR_IRQ_INDEX:
            return 1 if dev.cap(PCI_CAP_ID_EXP) else 0
        return 1 if index == VFIO_PCI_REQ_IRQ_INDEX else 0

    def _set_irqs(self, buf, fds):
        argsz = _minsz(buf, 20)
        flags, index, start, count = struct.unpack_from("<IIII", buf, 4)
        if index >= VFIO_PCI_NUM_IRQS or flags & ~(VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK):
            raise KernelError(errno.EINVAL)
        data_type, action = flags & VFIO_IRQ_SET_DATA_TYPE_MASK, flags & VFIO_IRQ_SET_ACTION_TYPE_MASK
        if bin(data_type).count("1") != 1 or bin(action).count("1") != 1:
            raise KernelError(errno.EINVAL)
        max_irqs = self._irq_count(index)
        if max_irqs == 0 or start >= max_irqs and count or start + count > max_irqs:
            raise KernelError(errno.EINVAL)
        size = {VFIO_IRQ_SET_DATA_NONE: 0, VFIO_IRQ_SET_DATA_BOOL: 1, VFIO_IRQ_SET_DATA_EVENTFD: 4}[data_type]
        if argsz - 20 < size * count:
            raise KernelError(errno.EINVAL)
        if index != VFIO_PCI_MSIX_IRQ_INDEX:
            return 0  # ERR and REQ notifications are accepted and never signalled
        if action != VFIO_IRQ_SET_ACTION_TRIGGER:
            raise KernelError(errno.EINVAL, "MSI-X vectors cannot be masked through VFIO")
        dev = self.dev
        if data_type == VFIO_IRQ_SET_DATA_NONE:
            if count == 0:
                dev.unwire_all()
            else:
                for v in range(start, start + count):
                    dev.hw.msix.raise_vector(v)
            return 0
        if data_type == VFIO_IRQ_SET_DATA_BOOL:
            for i in range(count):
                if buf[20 + i]:
                    dev.hw.msix.raise_vector(start + i)
            return 0
        values = struct.unpack_from(f"<{count}i", buf, 20)
        it = iter(fds)
        wanted = []
        for i, value in enumerate(values):
            if value >= 0:
                fd = next(it, None)
                if fd is None:
                    raise KernelError(errno.EBADF)
                wanted.append((start + i, fd))
            else:
                wanted.append((start + i, None))
        for vector, fd in wanted:
            dev.wire(vector, RealFile(fd) if fd is not None else None)
        return 0

    def _region(self, offset: int, length: int) -> tuple[int, int, int]:
        """(index, offset in it, the length to access), or the kernel's error:
        config space vfio_pci_config_rw (all of it inside cfg_size, else
        EFAULT), a BAR vfio_pci_bar_rw (start inside, else EINVAL; the access
        is cut at the end: a short read or write)."""
        if not self.bound:
            raise KernelError(errno.EINVAL, "bind the device to an iommufd first")
        index, off = offset >> VFIO_PCI_OFFSET_SHIFT, offset & OFFSET_MASK
        size = self._region_size(index) if index < VFIO_PCI_NUM_REGIONS else 0
        if index == VFIO_PCI_CONFIG_REGION_INDEX:
            if off >= size or off + length > size:
                raise KernelError(errno.EFAULT, "config access outside the function's config space")
            return index, off, length
        if off >= size:
            raise KernelError(errno.EINVAL, "access outside the region")
        return index, off, min(length, size - off)

    def pread(self, length, offset):
        if length <= 0:
            return b""
        index, off, length = self._region(offset, length)
        if index == VFIO_PCI_CONFIG_REGION_INDEX:
            if off <= PCI_COMMAND + 1 and off + length > PCI_COMMAND:
                self.dev.sync_command_from_hw()
            return bytes(self.dev.vconfig[off:off + length])
        return self.dev.hw.bar_read(index, off, length)

    def pwrite(self, data, offset):
        if not data:
            return 0
        index, off, length = self._region(offset, len(data))
        data = bytes(data[:length])
        if index == VFIO_PCI_CONFIG_REGION_INDEX:
            self._busy_if_preserved()
            self.dev.config_write(off, data)
            return length
        self.dev.hw.bar_write(index, off, data)
        return length

    def release(self):
        dev = self.dev
        if self.ictx is not None:
            if not self.kernel.dropping:
                self.ictx.unbind(self.dev_id)
            os.close(self.ictx_ref)
            self.ictx = None
        if dev.bound_file is self:
            dev.bound_file = None
        if self.kernel.dropping:
            return  # the old kernel is going away: nothing touches the hardware
        if dev.bound_file is None and dev.preserved is None:
            dev.disable()


class VfioSubsystem:
    def __init__(self, kernel):
        self.kernel = kernel
        self.devices = {bdf: VfioPciDevice(i, hw) for i, (bdf, hw) in enumerate(sorted(kernel.machine.devices.items()))}

    def by_name(self, name: str) -> VfioPciDevice | None:
        return next((d for d in self.devices.values() if d.name == name), None)

    def cdev_names(self) -> list[str]:
        return [d.name for d in self.devices.values()]

    def cdev_name(self, bdf: str) -> str:
        return self.devices[bdf].name

    def open_node(self, path: str) -> VfioDeviceFile | None:
        if not path.startswith("/dev/vfio/devices/vfio"):
            return None
        dev = self.by_name(path.rsplit("/", 1)[-1])
        if dev is None:
            raise KernelError(errno.ENOENT, f"{path}: no such device")
        if dev.incoming is not None:
            raise KernelError(errno.EBUSY, f"{dev.hw.bdf} is preserved: retrieve it from its LUO session")
        return VfioDeviceFile(self.kernel, dev)

    def list_node(self, path: str) -> list[str] | None:
        """/dev/vfio/devices, and each function's /sys/bus/pci/devices/BDF/{,vfio-dev}."""
        if path == "/dev/vfio/devices":
            return self.cdev_names()
        prefix = "/sys/bus/pci/devices/"
        if path.startswith(prefix):
            bdf, _, rest = path[len(prefix):].partition("/")
            if bdf in self.devices:
                if rest == "":
                    return ["config", "vfio-dev"]
                if rest == "vfio-dev":
                    return [self.cdev_name(bdf)]
        return None

    def drop(self) -> None:
        for dev in self.devices.values():
            for e in list(dev.msix.values()) + list(dev.frozen_msix.values()):
                e.close()
            dev.msix.clear()
            dev.frozen_msix.clear()

    def status(self) -> list[dict]:
        out = []
        for bdf, dev in self.devices.items():
            out.append({"bdf": bdf, "cdev": f"/dev/vfio/devices/{dev.name}", "bound": dev.bound_file is not None,
                        "preserved": dev.preserved is not None, "incoming": dev.incoming is not None,
                        "msix_vectors": sorted(dev.msix), **dev.hw.summary()})
        return out


class VfioHandler(FileHandler):
    compatible = "vfio-pci-v1"

    def can_preserve(self, target) -> bool:
        return isinstance(target, VfioDeviceFile)

    def preserve(self, lf: LuoFile) -> dict:
        dev = lf.target.dev
        if dev.preserved is not None:
            raise KernelError(errno.EBUSY)
        dev.preserved = lf
        return {"bdf": dev.hw.bdf}

    def unpreserve(self, lf: LuoFile) -> None:
        lf.target.dev.preserved = None

    def freeze(self, lf: LuoFile) -> dict:
        dev: VfioPciDevice = lf.target.dev
        profile = self.kernel.profile
        if profile == RESET_ON_FREEZE:
            if dev.msix:
                raise KernelError(errno.EINVAL, f"{dev.hw.bdf}: interrupts are still enabled "
                                                "(the reset-on-freeze kernel needs userspace to disable them)")
            state = {"bdf": dev.hw.bdf, "vconfig": bytes(dev.vconfig), "msix": []}
            dev.hw.flr()  # the upstream series resets the device at freeze: DMA stops
            return state
        dev.sync_command_from_hw()
        vectors = sorted(dev.msix)
        dev.frozen_msix = dev.unwire_all(keep=True)  # interrupts off across the kexec
        return {"bdf": dev.hw.bdf, "vconfig": bytes(dev.vconfig), "msix": vectors}

    def unfreeze(self, lf: LuoFile) -> None:
        dev: VfioPciDevice = lf.target.dev
        for vector, eventfd in sorted(dev.frozen_msix.items()):
            dev.wire(vector, eventfd)  # the update was cancelled: interrupts back on
        dev.frozen_msix = {}

    def hardware(self, state: dict):
        if self.kernel.profile == RESET_ON_FREEZE:
            return set(), set(), set()  # reset at freeze: nothing of it to keep running
        return {state["bdf"]}, set(), set()

    def restore(self, lf: LuoFile) -> None:
        dev = self.kernel.vfio.devices.get(lf.state["bdf"])
        if dev is None:
            lf.retrieve_status = -errno.ENODEV
            return
        dev.incoming = lf
        dev.vconfig[:] = lf.state["vconfig"]
        dev.sync_command_from_hw()

    def retrieve(self, lf: LuoFile) -> VfioDeviceFile:
        dev = self.kernel.vfio.devices[lf.state["bdf"]]
        dev.incoming = None
        return VfioDeviceFile(self.kernel, dev)

    def can_finish(self, lf: LuoFile) -> bool:
        return isinstance(lf.target, VfioDeviceFile) and lf.target.bound

    def finish(self, lf: LuoFile) -> None:
        pass


register_subsystem("vfio", VfioSubsystem)
register_file_handler(VfioHandler)
