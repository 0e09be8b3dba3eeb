"""A driver for QEMU's edu PCI device (hw/misc/edu.c, docs/specs/edu.rst) over a
VFIO cdev: what the lab's guest-side checks drive through luvmm's handles.

Its registers and their rules are devices/edu_regs.py's (the VMM's synthetic
edu driver uses the same table); the names here are the lab checks' own
aliases of them.
"""

from __future__ import annotations

import os
import select
import struct

from luvmm.devices.vfio import VfioDevice
from luvmm.uapi.vfio import (
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_BAR0_REGION_INDEX,
)

from luvmm.devices.edu_regs import (  # noqa: E402,F401 -- the names the lab's checks use, from the one table
    EDU_CMD_DMA_FROM as DMA_TO_RAM,
    EDU_CMD_DMA_IRQ as DMA_IRQ_ON_DONE,
    EDU_CMD_DMA_START as DMA_RUN,
    EDU_DMA_IRQ as DMA_IRQ,
    EDU_DMA_MASK as DMA_MASK,
    EDU_DMA_SIZE_MAX as BUFFER_SIZE,
    EDU_DMA_START as BUFFER,
    EDU_ID as ID_VALUE,
    EDU_REG_ALIVE as LIVENESS,
    EDU_REG_DMA_CMD as DMA_CMD,
    EDU_REG_DMA_COUNT as DMA_COUNT,
    EDU_REG_DMA_DST as DMA_DST,
    EDU_REG_DMA_SRC as DMA_SRC,
    EDU_REG_ID as ID,
    EDU_REG_INTR_ACK as IRQ_ACK,
    EDU_REG_INTR_RAISE as IRQ_RAISE,
    EDU_REG_INTR_STATUS as IRQ_STATUS,
    PCI_DEVICE_ID_EDU as DEVICE,
    PCI_VENDOR_ID_QEMU as VENDOR,
)
from luvmm.uapi.pci_regs import PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY  # noqa: E402,F401


def wait_eventfd(fd: int, timeout: float) -> int:
    """The eventfd's count once it fires; 0 if it did not within ``timeout``
    (a bound, not a delay: select returns as soon as the interrupt arrives)."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return 0
    return struct.unpack("<Q", os.read(fd, 8))[0]


class Edu:
    def __init__(self, dev: VfioDevice):
        self.dev = dev

    def read(self, offset: int) -> int:
        return self.dev.read32(VFIO_PCI_BAR0_REGION_INDEX, offset)

    def write(self, offset: int, value: int) -> None:
        self.dev.write32(VFIO_PCI_BAR0_REGION_INDEX, offset, value)

    def write64(self, offset: int, value: int) -> None:
        self.dev.write64(VFIO_PCI_BAR0_REGION_INDEX, offset, value)

    def command(self) -> int:
        return struct.unpack("<H", self.dev.config_read(PCI_COMMAND, 2))[0]

    def set_command(self, value: int) -> None:
        self.dev.config_write(PCI_COMMAND, struct.pack("<H", value))

    def enable_bus_master(self) -> None:
        self.set_command(self.command() | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)

    def start_dma(self, src: int, dst: int, count: int, to_ram: bool) -> None:
        buffer_side = src if to_ram else dst
        if not (BUFFER <= buffer_side and buffer_side + count < BUFFER + BUFFER_SIZE and count > 0):
            raise ValueError("edu transfers must stay strictly inside its 4 KiB buffer")
        self.write64(DMA_SRC, src)
        self.write64(DMA_DST, dst)
        self.write64(DMA_COUNT, count)
        self.write64(DMA_CMD, DMA_RUN | DMA_IRQ_ON_DONE | (DMA_TO_RAM if to_ram else 0))

    def dma_busy(self) -> bool:
        return bool(self.read(DMA_CMD) & DMA_RUN)

    def dma(self, src: int, dst: int, count: int, to_ram: bool, irq_fd: int, timeout: float = 20.0) -> dict:
        """One transfer, completed when its interrupt arrives on ``irq_fd``;
        returns what was seen (interrupt count, status, busy bit after)."""
        self.start_dma(src, dst, count, to_ram)
        fired = wait_eventfd(irq_fd, timeout)
        status = self.read(IRQ_STATUS)
        busy = self.dma_busy()
        self.write(IRQ_ACK, status)
        return {"interrupts": fired, "irq_status": status, "busy_after": busy}

    # --- interrupts through VFIO ------------------------------------------------------------------

    def set_irq_eventfd(self, index: int, fd: int) -> None:
        self.dev.set_irqs(index, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, 0, 1,
                          struct.pack("<i", fd))

    def disable_irq(self, index: int) -> None:
        self.dev.set_irqs(index, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0)

    def unmask(self, index: int) -> None:
        self.dev.set_irqs(index, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK, 0, 1)
