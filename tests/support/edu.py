"""A stand-in for QEMU's edu (hw/misc/edu.c, docs/specs/edu.rst) for the
edu drivers' unit tests: its DMA moves between a bus address (IOVA = GPA
here) and the device's buffer, clears the run bit when done and raises
DMA_IRQ.  It answers both the driver-side handle calls the synthetic guest
makes (read32/write32/write64) and the region accesses the VMM forwards a
KVM guest's MMIO exits to (region_read/region_write).  What the lab's real
edu does is checked in the lab (tests/lab/test_lab_real_host.py)."""

import os
import struct

from luvmm.devices.vfio import RegionInfo
from luvmm.uapi.vfio import VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE
from luvmm.devices.edu_regs import (
    EDU_BAR_SIZE,
    EDU_CMD_DMA_FROM,
    EDU_CMD_DMA_START,
    EDU_DMA_IRQ,
    EDU_DMA_START,
    EDU_ID,
    EDU_REG_ALIVE,
    EDU_REG_DMA_CMD,
    EDU_REG_DMA_COUNT,
    EDU_REG_DMA_DST,
    EDU_REG_DMA_SRC,
    EDU_REG_ID,
    EDU_REG_INTR_ACK,
    EDU_REG_INTR_STATUS,
)


class Edu:
    """The stand-in: a transfer completes at the first read of the command
    register after it was started, unless ``hold`` keeps it under way."""

    def __init__(self, ram):
        self.ram, self.regs, self.buffer = ram, {}, bytearray(4096)
        self.hold, self.pending, self.corrupt = False, False, False
        #: The eventfd its MSI is signalled on, once the VMM armed one.
        self.msi_fd = None

    def read32(self, index, offset):
        if offset == EDU_REG_ID:
            return EDU_ID
        if offset == EDU_REG_ALIVE:
            return ~self.regs.get(EDU_REG_ALIVE, 0) & 0xFFFFFFFF
        if offset == EDU_REG_DMA_CMD and self.pending and not self.hold:
            self._transfer()
        return self.regs.get(offset, 0)

    def write32(self, index, offset, value):
        if offset == EDU_REG_INTR_ACK:
            self.regs[EDU_REG_INTR_STATUS] = self.regs.get(EDU_REG_INTR_STATUS, 0) & ~value
        else:
            self.regs[offset] = value

    def write64(self, index, offset, value):
        self.regs[offset] = value
        if offset == EDU_REG_DMA_CMD and value & EDU_CMD_DMA_START:
            self.pending = True

    def _transfer(self):
        src, dst, count, cmd = (self.regs[r] for r in (EDU_REG_DMA_SRC, EDU_REG_DMA_DST, EDU_REG_DMA_COUNT,
                                                       EDU_REG_DMA_CMD))
        if cmd & EDU_CMD_DMA_FROM:
            data = bytes(self.buffer[src - EDU_DMA_START:src - EDU_DMA_START + count])
            if self.corrupt:
                data = bytes([data[0] ^ 1]) + data[1:]
            self.ram[dst:dst + count] = data
        else:
            self.buffer[dst - EDU_DMA_START:dst - EDU_DMA_START + count] = self.ram[src:src + count]
        self.regs[EDU_REG_DMA_CMD] = cmd & ~EDU_CMD_DMA_START
        self.regs[EDU_REG_INTR_STATUS] = self.regs.get(EDU_REG_INTR_STATUS, 0) | EDU_DMA_IRQ
        self.pending = False
        if self.msi_fd is not None:
            os.eventfd_write(self.msi_fd, 1)  # its MSI, as vfio-pci signals it

    def reset(self):
        """What a function reset does: the transfer under way and the buffer are gone."""
        self.regs, self.buffer, self.pending = {}, bytearray(4096), False

    # --- the VFIO region interface (luvmm.vmm.passthrough.Passthrough.mmio) -----------------------------

    #: No fd: the run loop cannot reach this stand-in, and hands every access to it back to the VMM.
    fd = -1

    def region_info(self, index):
        """BAR0: edu's 1 MiB of registers, which a VMM may not map (no
        VFIO_REGION_INFO_FLAG_MMAP): each access is served by Passthrough.mmio."""
        return RegionInfo(index, VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE, EDU_BAR_SIZE, 0, [])

    def region_read(self, index, offset, length):
        value = self.read32(index, offset)
        return struct.pack("<Q", value)[:length]

    def region_write(self, index, offset, data):
        value = int.from_bytes(data, "little")
        if len(data) == 8 or offset >= EDU_REG_DMA_SRC:
            self.write64(index, offset, value)
        else:
            self.write32(index, offset, value)
