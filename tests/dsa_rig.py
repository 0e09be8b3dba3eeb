"""A DSA with memory behind an IOMMU domain, as the tests and the benchmark use it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from devices.dsa import DsaDevice
from devices.dsa_driver import STATE_SIZE, DmaBuffer, DsaDriver
from devices.iommu import IommuDomain
from devices.memory import PhysMem

IOVA = 0x1_0000_0000  # where the rig's memory appears to the device
DATA = 0x20000  # offset of the data area inside the memory, after the driver state


@dataclass
class Rig:
    dev: DsaDevice
    domain: IommuDomain
    mem: PhysMem
    memfd: int
    eventfds: list
    driver: DsaDriver

    @property
    def view(self) -> memoryview:
        return self.mem.view

    def iova(self, offset: int) -> int:
        return IOVA + offset

    def eventfd_count(self, vector: int) -> int:
        try:
            return os.eventfd_read(self.eventfds[vector])
        except BlockingIOError:
            return 0

    def close(self) -> None:
        self.dev.shutdown()
        self.driver.mem.view.release()
        for fd in self.eventfds:
            os.close(fd)
        self.mem.close()
        os.close(self.memfd)


def make_rig(size: int = 16 << 20, *, bandwidth: float | None = None, init: bool = True) -> Rig:
    dev = DsaDevice("0000:6a:01.0", bandwidth=bandwidth)
    dev.start()
    memfd = os.memfd_create("luvmm-dsa-test", os.MFD_ALLOW_SEALING)
    os.ftruncate(memfd, size)
    mem = PhysMem(memfd)
    domain = IommuDomain("test")
    domain.map(IOVA, mem, 0, size)
    dev.attach_domain(domain)
    eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(dev.msix.nvec)]
    for v, fd in enumerate(eventfds):
        dev.msix.set_eventfd(v, fd)
    driver = DsaDriver(dev, DmaBuffer(mem.view[:STATE_SIZE], IOVA))
    rig = Rig(dev, domain, mem, memfd, eventfds, driver)
    if init:
        driver.init()
    return rig
