"""A DSA with memory behind an IOMMU domain, as the tests and the benchmark use it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from luvmm.devices.emu.dsa import DsaDevice
from luvmm.devices.emu.dsa_driver import STATE_SIZE, DmaBuffer, DsaDriver
from luvmm.devices.emu.iommu import IommuDomain
from luvmm.devices.emu.memory import PhysMem

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


REC = 0x18000  # a completion record slot outside the driver's state


def submit(rig: Rig, *, wait: bool = True, completion: int | None = None, wq: int = 0, **fields) -> dict:
    """Write one descriptor to the portal; return its completion record once the device is idle."""
    from luvmm.uapi.idxd import pack_desc, unpack_completion

    record = REC if completion is None else completion
    if completion is None:
        rig.view[REC:REC + 32] = bytes(32)
        fields.setdefault("completion_addr", rig.iova(REC))
    rig.driver.desc_write(pack_desc(**fields), wq)
    if wait:
        assert rig.dev.wait_idle(10), "the device did not finish"
    return unpack_completion(bytes(rig.view[record:record + 32])) if record + 32 <= rig.mem.size else {}
