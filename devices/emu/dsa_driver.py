"""A DSA driver: the VFIO selftests' DSA driver (tools/testing/selftests/vfio/
lib/drivers/dsa/dsa.c), step for step, in Python.

It drives a device through a :class:`DeviceAccess` -- config space, BAR
registers and portal stores -- so the same driver runs against the emulated
device directly (tests, ``luvmm bench dsa``), and against a VFIO device fd
(the synthetic guest).  Its memory is a buffer the device reaches at a
known IOVA.  Polls are bounded by a deadline, never by a fixed sleep.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Protocol

from luvmm.devices.dsa_regs import (
    IDXD_CMD_ENABLE_DEVICE,
    IDXD_CMD_ENABLE_WQ,
    IDXD_CMD_RESET_DEVICE,
    IDXD_CMDSTS_ACTIVE,
    IDXD_CMDSTS_ERR_MASK,
    IDXD_CMDSTS_OFFSET,
    IDXD_CMD_OFFSET,
    IDXD_ENGCAP_OFFSET,
    IDXD_GENCAP_OFFSET,
    IDXD_GRPCAP_OFFSET,
    IDXD_MMIO_BAR,
    IDXD_SWERR_OFFSET,
    IDXD_SWERR_VALID,
    IDXD_TABLE_MULT,
    IDXD_TABLE_OFFSET,
    IDXD_WQ_BAR,
    IDXD_WQCAP_OFFSET,
    IDXD_WQCFG_MIN,
    command,
)
from luvmm.devices.emu.dsa_model import MSIX_TABLE
from luvmm.uapi.idxd import (
    DSA_COMP_SUCCESS,
    DSA_OPCODE_BATCH,
    DSA_OPCODE_MEMMOVE,
    IDXD_OP_FLAG_CRAV,
    IDXD_OP_FLAG_RCI,
    IDXD_OP_FLAG_RCR,
    pack_desc,
)
from luvmm.devices.emu.pci import MSIX_CAP_OFFSET
from luvmm.uapi.pci_regs import (
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_ENTRY_VECTOR_CTRL,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_VENDOR_ID,
)

MSIX_VECTOR = 1  # vectors 1+ are for work queue completions


class DeviceAccess(Protocol):
    def cfg_read(self, offset: int, size: int) -> bytes: ...
    def cfg_write(self, offset: int, data: bytes) -> None: ...
    def bar_read(self, index: int, offset: int, size: int) -> bytes: ...
    def bar_write(self, index: int, offset: int, data: bytes) -> None: ...


class VfioAccess:
    """A :class:`DeviceAccess` over a VFIO device (luvmm.devices.vfio.VfioDevice):
    its config region and its BAR regions, so that the driver runs unchanged
    on a device behind the emulated (or a real) vfio-pci -- the product's
    handle keeps the kernel's names only."""

    def __init__(self, dev):
        self.dev = dev

    def cfg_read(self, offset: int, size: int) -> bytes:
        return self.dev.config_read(offset, size)

    def cfg_write(self, offset: int, data: bytes) -> None:
        self.dev.config_write(offset, data)

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        return self.dev.region_read(index, offset, size)

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        self.dev.region_write(index, offset, data)


class DsaDriverError(RuntimeError):
    pass


@dataclass
class DmaBuffer:
    """Memory the device reaches: ``view`` is what the driver writes, ``iova`` where the device sees it."""

    view: memoryview
    iova: int

    def to_iova(self, offset: int) -> int:
        return self.iova + offset


# Layout of the driver's state in its DMA buffer (struct dsa_state).
BATCH_DESCS = 0x0000  # 32 x 64
COPY_DESCS = 0x1000  # 1024 x 64
COPY_COMPLETION = 0x11000
BATCH_COMPLETION = 0x11020
MSI_SRC = 0x11040
MSI_DST = 0x11048
STATE_SIZE = 0x12000


class DsaDriver:
    def __init__(self, dev: DeviceAccess, mem: DmaBuffer, *, timeout: float = 5.0, msix=None):
        if len(mem.view) < STATE_SIZE:
            raise ValueError(f"the driver needs {STATE_SIZE} bytes of DMA memory")
        self.dev = dev
        self.mem = mem
        self.timeout = timeout
        self.msix = msix
        self.memcpy_count = 0

    # --- register helpers -------------------------------------------------------------

    def readq(self, offset: int) -> int:
        return struct.unpack("<Q", self.dev.bar_read(IDXD_MMIO_BAR, offset, 8))[0]

    def readl(self, offset: int) -> int:
        return struct.unpack("<I", self.dev.bar_read(IDXD_MMIO_BAR, offset, 4))[0]

    def writeq(self, offset: int, value: int) -> None:
        self.dev.bar_write(IDXD_MMIO_BAR, offset, struct.pack("<Q", value))

    def writel(self, offset: int, value: int) -> None:
        self.dev.bar_write(IDXD_MMIO_BAR, offset, struct.pack("<I", value))

    def _deadline_poll(self, ready, what: str):
        deadline = time.monotonic() + self.timeout
        while True:
            self.check_sw_err()
            value = ready()
            if value:
                return value
            if time.monotonic() > deadline:
                raise DsaDriverError(f"timed out waiting for {what}")
            time.sleep(0)  # yield the GIL to the device's engines

    # --- dsa.c ------------------------------------------------------------------------------

    def probe(self) -> None:
        vendor, device = struct.unpack("<HH", self.dev.cfg_read(PCI_VENDOR_ID, 4))
        if (vendor, device) != (0x8086, 0x0B25):
            raise DsaDriverError(f"not a DSA: {vendor:04x}:{device:04x}")

    def check_sw_err(self) -> None:
        err = [self.readq(IDXD_SWERR_OFFSET + 8 * i) for i in range(4)]
        if err[0] & IDXD_SWERR_VALID:
            raise DsaDriverError("SWERR: " + " ".join(f"{w:#018x}" for w in err))

    def command(self, cmd: int, operand: int = 0) -> None:
        self.writel(IDXD_CMD_OFFSET, command(cmd, operand))
        status = self._deadline_poll(
            lambda: (lambda s: (s,) if not s & IDXD_CMDSTS_ACTIVE else None)(self.readl(IDXD_CMDSTS_OFFSET)),
            f"command {cmd}")[0]
        err = status & IDXD_CMDSTS_ERR_MASK
        if err:
            raise DsaDriverError(f"error issuing command {cmd:#x}: {err:#x}")

    def init(self) -> None:
        self.probe()
        self.dev.cfg_write(PCI_COMMAND, struct.pack(
            "<H", PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE))
        self.command(IDXD_CMD_RESET_DEVICE)
        self.gen_cap = self.readq(IDXD_GENCAP_OFFSET)
        self.wq_cap = self.readq(IDXD_WQCAP_OFFSET)
        self.group_cap = self.readq(IDXD_GRPCAP_OFFSET)
        self.engine_cap = self.readq(IDXD_ENGCAP_OFFSET)
        offsets = self.readq(IDXD_TABLE_OFFSET)
        self.wqcfg_table = ((offsets >> 16) & 0xFFFF) * IDXD_TABLE_MULT
        self.grpcfg_table = (offsets & 0xFFFF) * IDXD_TABLE_MULT
        self.max_xfer_shift = (self.gen_cap >> 16) & 0x1F
        self.max_batch_shift = (self.gen_cap >> 21) & 0xF
        self.max_batches = 32
        self.max_copies_per_batch = min(1 << self.max_batch_shift, 1024)
        self._wq_init()
        self._group_init()
        self.command(IDXD_CMD_ENABLE_DEVICE)
        self.command(IDXD_CMD_ENABLE_WQ, 0)
        self.msix_enable(MSIX_VECTOR)
        self.max_memcpy_count = self.max_batches * self.max_copies_per_batch
        self.max_memcpy_size = 1 << self.max_xfer_shift

    def _wq_init(self) -> None:
        total_wq_size = self.wq_cap & 0xFFFF
        if (self.wq_cap >> 16) & 0xFF == 0:
            raise DsaDriverError("no work queues")
        words = [0] * 8
        words[0] = total_wq_size
        words[2] = 1 | 1 << 4  # mode = dedicated, priority = 1
        words[3] = self.max_xfer_shift | self.max_batch_shift << 5
        wqcfg_size = 1 << (((self.wq_cap >> 24) & 0xF) + IDXD_WQCFG_MIN)
        for i in range(wqcfg_size // 4):
            self.writel(self.wqcfg_table + 4 * i, words[i] if i < len(words) else 0)

    def _group_init(self) -> None:
        if self.group_cap & 0xFF == 0 or self.engine_cap & 0xFF == 0:
            raise DsaDriverError("no groups or engines")
        self.writeq(self.grpcfg_table + 0, 1)  # wqs[0] = WQ 0
        self.writeq(self.grpcfg_table + 32, 1)  # engines = engine 0

    def msix_enable(self, vector: int) -> None:
        """What vfio_pci_msix_enable() gets done: MSI-X on, the vector unmasked.

        Over VFIO the kernel owns MSI-X: pass ``msix=`` to the driver (a
        callable taking the vector, e.g. one that issues VFIO_DEVICE_SET_IRQS);
        on a bare device the driver programs the capability and table itself."""
        if self.msix is not None:
            self.msix(vector)
            return
        flags = struct.unpack("<H", self.dev.cfg_read(MSIX_CAP_OFFSET + PCI_MSIX_FLAGS, 2))[0]
        self.dev.cfg_write(MSIX_CAP_OFFSET + PCI_MSIX_FLAGS, struct.pack("<H", flags | PCI_MSIX_FLAGS_ENABLE))
        self.writel(MSIX_TABLE + vector * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL, 0)

    def remove(self) -> None:
        self.command(IDXD_CMD_RESET_DEVICE)

    # --- operations ---------------------------------------------------------------------------

    def desc_write(self, desc: bytes, wq: int = 0) -> None:
        self.dev.bar_write(IDXD_WQ_BAR, wq * 4 * 4096, desc)

    def copy_desc(self, src: int, dst: int, size: int, interrupt: bool, completion: int = COPY_COMPLETION) -> bytes:
        flags = IDXD_OP_FLAG_CRAV | IDXD_OP_FLAG_RCR | (IDXD_OP_FLAG_RCI if interrupt else 0)
        return pack_desc(opcode=DSA_OPCODE_MEMMOVE, flags=flags, priv=1, src=src, dst=dst, xfer_size=size,
                         completion_addr=self.mem.to_iova(completion),
                         int_handle=MSIX_VECTOR if interrupt else 0)

    def memcpy_one(self, src: int, dst: int, size: int, interrupt: bool = False) -> None:
        self.mem.view[COPY_COMPLETION:COPY_COMPLETION + 32] = bytes(32)
        desc = self.copy_desc(src, dst, size, interrupt)
        self.mem.view[COPY_DESCS:COPY_DESCS + 64] = desc
        self.desc_write(desc)

    def memcpy_batch(self, src: int, dst: int, size: int, count: int) -> None:
        self.mem.view[BATCH_COMPLETION:BATCH_COMPLETION + 32] = bytes(32)
        copy = bytearray(self.copy_desc(src, dst, size, False))
        struct.pack_into("<I", copy, 4, (IDXD_OP_FLAG_CRAV | DSA_OPCODE_MEMMOVE << 24))  # no RCR per copy
        self.mem.view[COPY_DESCS:COPY_DESCS + 64 * 1024] = bytes(copy) * 1024
        i = 0
        while i < self.max_batches and count:
            nr = min(count, self.max_copies_per_batch)
            count -= nr
            if count == 1:  # batches need at least 2 copies
                nr -= 1
                count += 1
            flags = IDXD_OP_FLAG_CRAV | (IDXD_OP_FLAG_RCR if not count else 0)
            desc = pack_desc(opcode=DSA_OPCODE_BATCH, flags=flags, priv=1,
                             completion_addr=self.mem.to_iova(BATCH_COMPLETION),
                             src=self.mem.to_iova(COPY_DESCS), xfer_size=nr)
            self.mem.view[BATCH_DESCS + 64 * i:BATCH_DESCS + 64 * (i + 1)] = desc
            self.desc_write(desc)
            i += 1
        if count:
            raise DsaDriverError(f"failed to start {count} copies")

    def memcpy_start(self, src: int, dst: int, size: int, count: int) -> None:
        if count == 1:
            self.memcpy_one(src, dst, size)
        else:
            self.memcpy_batch(src, dst, size, count)
        self.memcpy_count = count

    def completion_wait(self, offset: int) -> int:
        status = self._deadline_poll(lambda: self.mem.view[offset], "a completion")
        return status

    def memcpy_wait(self) -> int:
        status = self.completion_wait(COPY_COMPLETION if self.memcpy_count == 1 else BATCH_COMPLETION)
        self.memcpy_count = 0
        if status != DSA_COMP_SUCCESS:
            raise DsaDriverError(f"error detected during memcpy operation: {status:#x}")
        return status

    def send_msi(self) -> None:
        self.memcpy_one(self.mem.to_iova(MSI_SRC), self.mem.to_iova(MSI_DST), 8, interrupt=True)
        if self.completion_wait(COPY_COMPLETION) != DSA_COMP_SUCCESS:
            raise DsaDriverError("send_msi copy failed")
