"""A PCI Express function: configuration space, BARs, MSI-X and FLR.

Register names are those of include/uapi/linux/pci_regs.h.  Configuration
space is 4 KiB with a write mask per byte (which bits software may change),
as in QEMU's PCIDevice: read-only bits stay put whatever is written, BAR
sizing works by writing all ones, the command register's Memory Space and Bus
Master Enable bits gate the device.  MSI-X lives in a BAR (table and PBA);
an interrupt raised on a vector that is masked -- by its table entry, by the
function mask, because MSI-X is off, or because no eventfd is wired to it yet
-- sets the vector's PBA bit and is delivered when that changes, never lost.
"""

from __future__ import annotations

import os
import struct
from _thread import RLock  # threading.RLock is this; `threading` itself costs 4 ms to import

from luvmm.uapi.pci_regs import (
    PCI_VENDOR_ID,
    PCI_COMMAND,
    PCI_COMMAND_MEMORY,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_PARITY,
    PCI_COMMAND_SERR,
    PCI_COMMAND_INTX_DISABLE,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_REVISION_ID,
    PCI_CLASS_PROG,
    PCI_BASE_ADDRESS_0,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_CAPABILITY_LIST,
    PCI_INTERRUPT_LINE,
    PCI_CAP_ID_EXP,
    PCI_CAP_ID_MSIX,
    PCI_EXP_FLAGS,
    PCI_EXP_TYPE_RC_END,
    PCI_EXP_DEVCAP,
    PCI_EXP_DEVCAP_FLR,
    PCI_EXP_DEVCTL,
    PCI_EXP_DEVCTL_BCR_FLR,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_MASKALL,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_TABLE,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_ENTRY_VECTOR_CTRL,
    PCI_MSIX_ENTRY_CTRL_MASKBIT,
    PCI_CFG_SPACE_EXP_SIZE,
)

PCIE_CAP_OFFSET = 0x40
MSIX_CAP_OFFSET = 0x80


class Bar:
    """A 64-bit memory BAR of ``size`` bytes (a power of two)."""

    __slots__ = ("index", "size", "prefetchable")

    def __init__(self, index: int, size: int, prefetchable: bool = True):
        self.index, self.size, self.prefetchable = index, size, prefetchable


class Msix:
    """MSI-X state: the table and PBA (in a BAR), enable/mask, and the
    eventfd each vector is wired to (what VFIO_DEVICE_SET_IRQS hands over)."""

    def __init__(self, nvec: int, lock: RLock):
        self.nvec = nvec
        self.lock = lock
        self.table = bytearray(PCI_MSIX_ENTRY_SIZE * nvec)
        self.pending = 0
        self.enabled = False
        self.function_masked = False
        self.eventfds: list[int | None] = [None] * nvec
        self.delivered = [0] * nvec
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.table[:] = bytes(len(self.table))
            for v in range(self.nvec):  # every vector masked after reset
                self.table[v * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL] = PCI_MSIX_ENTRY_CTRL_MASKBIT
            self.pending = 0
            self.enabled = False
            self.function_masked = False

    def entry_masked(self, v: int) -> bool:
        return bool(self.table[v * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL] & PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def _deliverable(self, v: int) -> bool:
        return (self.enabled and not self.function_masked and not self.entry_masked(v)
                and self.eventfds[v] is not None)

    def _fire(self, v: int) -> None:
        try:
            os.eventfd_write(self.eventfds[v], 1)
        except OSError:
            # The eventfd's owner is gone (closed or unwritable): the message is
            # lost on the bus like a write to a dead address; keep it pending.
            self.pending |= 1 << v
            return
        self.delivered[v] += 1

    def raise_vector(self, v: int) -> bool:
        """The device signals vector ``v``; returns whether it was delivered now."""
        if not 0 <= v < self.nvec:
            return False
        with self.lock:
            if self._deliverable(v):
                self._fire(v)
                return True
            self.pending |= 1 << v
            return False

    def deliver_pending(self) -> None:
        """Called on every change that can unmask a vector."""
        with self.lock:
            for v in range(self.nvec):
                if self.pending & (1 << v) and self._deliverable(v):
                    self.pending &= ~(1 << v)
                    self._fire(v)

    def set_eventfd(self, v: int, fd: int | None) -> None:
        with self.lock:
            self.eventfds[v] = fd
        self.deliver_pending()

    def set_masked(self, v: int, masked: bool) -> None:
        with self.lock:
            off = v * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL
            ctrl = self.table[off]
            self.table[off] = (ctrl | PCI_MSIX_ENTRY_CTRL_MASKBIT) if masked else (ctrl & ~PCI_MSIX_ENTRY_CTRL_MASKBIT)
        self.deliver_pending()

    # --- BAR accesses -------------------------------------------------------------------

    def table_read(self, off: int, size: int) -> bytes:
        with self.lock:
            return bytes(self.table[off:off + size])

    def table_write(self, off: int, data: bytes) -> None:
        with self.lock:
            self.table[off:off + len(data)] = data
        self.deliver_pending()

    def pba_read(self, off: int, size: int) -> bytes:
        with self.lock:
            raw = self.pending.to_bytes((self.nvec + 63) // 64 * 8, "little")
        return raw[off:off + size].ljust(size, b"\0")


class PciFunction:
    """A PCIe endpoint function with a type 0 header, a PCIe capability (FLR)
    and an MSI-X capability.  Subclasses implement their BARs."""

    def __init__(self, bdf: str, *, vendor: int, device: int, class_code: int, revision: int,
                 bars: list[Bar], msix_vectors: int, msix_bar: int, msix_table: int, msix_pba: int,
                 subsystem_vendor: int = 0, subsystem: int = 0):
        self.bdf = bdf
        self.lock = RLock()
        self.bars = {b.index: b for b in bars}
        self.msix = Msix(msix_vectors, self.lock)
        self.msix_bar, self.msix_table_offset, self.msix_pba_offset = msix_bar, msix_table, msix_pba
        self.flr_count = 0
        cfg = bytearray(PCI_CFG_SPACE_EXP_SIZE)
        wmask = bytearray(PCI_CFG_SPACE_EXP_SIZE)
        struct.pack_into("<HH", cfg, PCI_VENDOR_ID, vendor, device)
        struct.pack_into("<H", wmask, PCI_COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_PARITY
                         | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE)
        struct.pack_into("<H", cfg, PCI_STATUS, PCI_STATUS_CAP_LIST)
        cfg[PCI_REVISION_ID] = revision
        cfg[PCI_CLASS_PROG:PCI_CLASS_PROG + 3] = class_code.to_bytes(3, "little")
        for bar in bars:
            off = PCI_BASE_ADDRESS_0 + 4 * bar.index
            flags = PCI_BASE_ADDRESS_MEM_TYPE_64 | (PCI_BASE_ADDRESS_MEM_PREFETCH if bar.prefetchable else 0)
            struct.pack_into("<I", cfg, off, flags)
            struct.pack_into("<Q", wmask, off, ~(bar.size - 1) & 0xFFFFFFFFFFFFFFF0)
        struct.pack_into("<HH", cfg, PCI_SUBSYSTEM_VENDOR_ID, subsystem_vendor, subsystem)
        cfg[PCI_CAPABILITY_LIST] = PCIE_CAP_OFFSET
        wmask[PCI_INTERRUPT_LINE] = 0xFF
        # PCI Express capability: a root-complex integrated endpoint with FLR.
        cfg[PCIE_CAP_OFFSET] = PCI_CAP_ID_EXP
        cfg[PCIE_CAP_OFFSET + 1] = MSIX_CAP_OFFSET
        struct.pack_into("<H", cfg, PCIE_CAP_OFFSET + PCI_EXP_FLAGS, 2 | (PCI_EXP_TYPE_RC_END << 4))
        struct.pack_into("<I", cfg, PCIE_CAP_OFFSET + PCI_EXP_DEVCAP, PCI_EXP_DEVCAP_FLR)
        struct.pack_into("<H", wmask, PCIE_CAP_OFFSET + PCI_EXP_DEVCTL, 0xFFFF)  # BCR_FLR self-clears
        # MSI-X capability.
        cfg[MSIX_CAP_OFFSET] = PCI_CAP_ID_MSIX
        struct.pack_into("<H", cfg, MSIX_CAP_OFFSET + PCI_MSIX_FLAGS, msix_vectors - 1)
        struct.pack_into("<H", wmask, MSIX_CAP_OFFSET + PCI_MSIX_FLAGS, PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
        struct.pack_into("<II", cfg, MSIX_CAP_OFFSET + PCI_MSIX_TABLE, msix_table | msix_bar, msix_pba | msix_bar)
        self._reset_config = bytes(cfg)
        self.config = cfg
        self.wmask = bytes(wmask)

    # --- configuration space ------------------------------------------------------------

    @property
    def command(self) -> int:
        return struct.unpack_from("<H", self.config, PCI_COMMAND)[0]

    @property
    def bus_master(self) -> bool:
        return bool(self.command & PCI_COMMAND_MASTER)

    @property
    def memory_enabled(self) -> bool:
        return bool(self.command & PCI_COMMAND_MEMORY)

    def cfg_read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > PCI_CFG_SPACE_EXP_SIZE:
            raise ValueError("config access outside the 4 KiB configuration space")
        with self.lock:
            return bytes(self.config[offset:offset + size])

    def cfg_write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > PCI_CFG_SPACE_EXP_SIZE:
            raise ValueError("config access outside the 4 KiB configuration space")
        flr = False
        with self.lock:
            old_command = self.command
            for i, byte in enumerate(data):
                pos = offset + i
                mask = self.wmask[pos]
                self.config[pos] = (self.config[pos] & ~mask) | (byte & mask)
            devctl = PCIE_CAP_OFFSET + PCI_EXP_DEVCTL
            if offset <= devctl + 1 < offset + len(data):
                if self.config[devctl + 1] & (PCI_EXP_DEVCTL_BCR_FLR >> 8):
                    self.config[devctl + 1] &= ~(PCI_EXP_DEVCTL_BCR_FLR >> 8) & 0xFF  # reads as 0
                    flr = True
            flags = struct.unpack_from("<H", self.config, MSIX_CAP_OFFSET + PCI_MSIX_FLAGS)[0]
            self.msix.enabled = bool(flags & PCI_MSIX_FLAGS_ENABLE)
            self.msix.function_masked = bool(flags & PCI_MSIX_FLAGS_MASKALL)
            new_command = self.command
        if flr:
            self.flr()
            return
        if new_command != old_command:
            self.command_changed(old_command, new_command)
        self.msix.deliver_pending()

    def set_command_bits(self, bits: int, on: bool) -> None:
        """What the machine itself does to the command register (kexec clears
        Bus Master Enable on functions that are not preserved)."""
        value = (self.command | bits) if on else (self.command & ~bits)
        self.cfg_write(PCI_COMMAND, struct.pack("<H", value))

    def flr(self) -> None:
        """Function level reset: configuration and device state back to power-on."""
        with self.lock:
            self.flr_count += 1
            old_command = self.command
            self.config[:] = self._reset_config
            self.msix.reset()
        self.command_changed(old_command, self.command)
        self.reset_function()

    # --- BARs ----------------------------------------------------------------------------

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        self._check_bar(index, offset, size)
        if index == self.msix_bar:
            if self.msix_table_offset <= offset < self.msix_table_offset + len(self.msix.table):
                return self.msix.table_read(offset - self.msix_table_offset, size)
            if self.msix_pba_offset <= offset < self.msix_pba_offset + 8 * ((self.msix.nvec + 63) // 64):
                return self.msix.pba_read(offset - self.msix_pba_offset, size)
        return self.mmio_read(index, offset, size)

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        self._check_bar(index, offset, len(data))
        if index == self.msix_bar:
            if self.msix_table_offset <= offset < self.msix_table_offset + len(self.msix.table):
                self.msix.table_write(offset - self.msix_table_offset, data)
                return
            if self.msix_pba_offset <= offset < self.msix_pba_offset + 8 * ((self.msix.nvec + 63) // 64):
                return  # the PBA is read-only
        self.mmio_write(index, offset, data)

    def _check_bar(self, index: int, offset: int, size: int) -> None:
        bar = self.bars.get(index)
        if bar is None:
            raise ValueError(f"BAR{index} is not implemented")
        if offset < 0 or size <= 0 or offset + size > bar.size:
            raise ValueError(f"BAR{index} access [{offset:#x}, +{size}) outside its {bar.size:#x} bytes")

    # --- for subclasses -------------------------------------------------------------------

    def mmio_read(self, index: int, offset: int, size: int) -> bytes:
        return bytes(size)

    def mmio_write(self, index: int, offset: int, data: bytes) -> None:
        pass

    def command_changed(self, old: int, new: int) -> None:
        """The command register changed (Bus Master Enable gates DMA)."""

    def reset_function(self) -> None:
        """Device-specific part of a function level reset."""
