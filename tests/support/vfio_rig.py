"""A VMM-shaped set-up over the host interface: guest RAM in a sealed memfd,
mapped into an IOAS at IOVA 0 with MAP_FILE, a HWPT, the DSA bound and
attached, MSI-X through an eventfd, and the selftests' DSA driver on top."""

from __future__ import annotations

import mmap
import os

from luvmm.devices.emu.dsa_driver import STATE_SIZE, DmaBuffer, DsaDriver, VfioAccess
from luvmm.devices.iommufd import IommuFd
from luvmm.devices.vfio import VfioDevice
from luvmm.vmm.memory import sealed_memfd

RAM_IOVA = 0
DATA = 0x20000
RAM_TOKEN, IOMMUFD_TOKEN, DEVICE_TOKEN, HWPT_TOKEN = 0x1, 0x2, 0x3, 0x77


class VfioRig:
    def __init__(self, host, size: int = 64 << 20, *, memfd: int | None = None, init: bool = True):
        self.host = host
        self.size = size
        self.memfd = sealed_memfd("guest-ram", size) if memfd is None else memfd
        self.map = mmap.mmap(self.memfd, size)
        self.view = memoryview(self.map)
        self.iommufd = IommuFd.open(host)
        self.ioas = self.iommufd.ioas_alloc()
        self.iommufd.ioas_map_file(self.ioas, self.memfd, 0, size, iova=RAM_IOVA)
        bdf = host.listdir("/sys/bus/pci/devices")[0]
        self.dev = VfioDevice.open_bdf(host, bdf)
        self.dev_id = self.dev.bind_iommufd(self.iommufd)
        self.hwpt = self.iommufd.hwpt_alloc(self.dev_id, self.ioas)
        self.dev.attach_pt(self.hwpt)
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._drivers: list[DsaDriver] = []
        self.driver = DsaDriver(VfioAccess(self.dev), DmaBuffer(self.view[:STATE_SIZE], RAM_IOVA),
                                msix=lambda v: self.dev.enable_msix([self.eventfd], start=v))
        if init:
            self.driver.init()

    def preserve(self, session, *, ram=True, iommufd=True, device=True) -> None:
        if ram:
            session.preserve_fd(self.memfd, RAM_TOKEN)
        if iommufd:
            self.iommufd.hwpt_liveupdate_mark_preserve(self.hwpt, HWPT_TOKEN)
            session.preserve_fd(self.iommufd.fd, IOMMUFD_TOKEN)
        if device:
            session.preserve_fd(self.dev.fd, DEVICE_TOKEN)

    def interrupts(self) -> int:
        try:
            return os.eventfd_read(self.eventfd)
        except BlockingIOError:
            return 0

    def driver_for(self, dev, **kw) -> DsaDriver:
        """A driver for a device fd retrieved after a kexec (no init: the device kept its state)."""
        drv = DsaDriver(VfioAccess(dev), DmaBuffer(self.view[:STATE_SIZE], RAM_IOVA), **kw)
        self._drivers.append(drv)
        return drv

    def close(self) -> None:
        for drv in [self.driver] + self._drivers:
            drv.mem.view.release()
        self.view.release()
        self.map.close()
