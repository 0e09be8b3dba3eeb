"""The guest: physical memory layout, the firmware image and the mailbox.

Guest-physical map (IOVA = GPA for the device):

    0x0000_1000  page tables (identity map of the low 4 GiB, 2 MiB pages, user-accessible)
    0x0000_8000  mailbox page (vmm/firmware/mailbox.h)
    0x0001_0000  firmware image (vmm/firmware/fw.bin)
    0x0020_0000  top of the stack (grows down)
    0x0020_0000  DMA area: completion records, descriptor lists, buffers
    0xFE00_0000  DSA BAR0 (64 KiB), 0xFE10_0000 DSA BAR2 (128 KiB): MMIO
    RAM above 3 GiB continues at 4 GiB, as on a PC.
"""

from __future__ import annotations

import os
import struct

FIRMWARE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "firmware", "fw.bin")
PAGE_TABLES_GPA = 0x1000
MAILBOX_GPA = 0x8000
FIRMWARE_GPA = 0x10000
STACK_TOP = 0x200000
DMA_BASE = 0x200000
BAR0_GPA = 0xFE000000
BAR2_GPA = 0xFE100000
MMIO_START, MMIO_END = 0xFE000000, 0xFE200000
LOW_RAM_LIMIT = 3 << 30
HIGH_RAM_BASE = 4 << 30
MAILBOX_MAGIC = 0x584F424D4D56554C
MIN_MEMORY = 32 << 20

# struct mailbox, field by field (u64 each).
MAILBOX_FIELDS = ("magic", "bar0", "bar2", "dma_base", "slots", "pairs", "xfer", "init_device",
                  "state", "heartbeat", "submitted", "completed", "descs_ok", "errors", "verify_failures",
                  "last_error", "inflight", "init_error", "recoveries")
AUX_HEARTBEAT = len(MAILBOX_FIELDS) * 8
GUEST_STATE = {0: "not started", 1: "initialising", 2: "running", 3: "device error"}


def offset(field: str) -> int:
    return MAILBOX_GPA + 8 * MAILBOX_FIELDS.index(field)


class Mailbox:
    """The mailbox seen through a view of guest RAM."""

    def __init__(self, ram: memoryview):
        self.ram = ram

    def __getitem__(self, field: str) -> int:
        return struct.unpack_from("<Q", self.ram, offset(field))[0]

    def __setitem__(self, field: str, value: int) -> None:
        struct.pack_into("<Q", self.ram, offset(field), value)

    def snapshot(self) -> dict[str, int]:
        values = struct.unpack_from(f"<{len(MAILBOX_FIELDS)}Q", self.ram, MAILBOX_GPA)
        return dict(zip(MAILBOX_FIELDS, values))


def ram_ranges(size: int) -> list[tuple[int, int, int]]:
    """(GPA, memfd offset, length) of guest RAM: below 3 GiB, and the rest from 4 GiB."""
    low = min(size, LOW_RAM_LIMIT)
    ranges = [(0, 0, low)]
    if size > low:
        ranges.append((HIGH_RAM_BASE, low, size - low))
    return ranges


def workload_bytes(slots: int, pairs: int, xfer: int) -> int:
    return 0x100000 + slots * 16 * 2 * xfer  # records and lists, then the buffers


def load_firmware(ram: memoryview, *, slots: int, pairs: int, xfer: int, init_device: bool = True) -> None:
    with open(FIRMWARE, "rb") as f:
        image = f.read()
    ram[FIRMWARE_GPA:FIRMWARE_GPA + len(image)] = image
    mb = Mailbox(ram)
    for field, value in (("magic", MAILBOX_MAGIC), ("bar0", BAR0_GPA), ("bar2", BAR2_GPA), ("dma_base", DMA_BASE),
                         ("slots", slots), ("pairs", pairs), ("xfer", xfer), ("init_device", int(init_device))):
        mb[field] = value


# The firmware's DMA area (vmm/firmware/fw.c): batch records, then descriptor lists.
MAX_PAIRS = 16


def batch_record(dma_base: int, slot: int) -> int:
    return dma_base + slot * 32


def batch_pattern_at(dma_base: int, slot: int) -> int:
    """Where a slot's batch keeps its unique pattern: the comp_pattern of its first COMPVAL."""
    return dma_base + 0x20000 + slot * 2 * MAX_PAIRS * 64 + 64 + 24


def batches_in_flight(ram) -> dict[int, int]:
    """{slot: the batch's pattern} for every batch submitted and not completed."""
    mb = Mailbox(ram)
    base, slots = mb["dma_base"], mb["slots"]
    if mb["state"] != 2:
        return {}
    out = {}
    for slot in range(min(slots, 64)):
        if ram[batch_record(base, slot)] == 0:
            pattern = struct.unpack_from("<Q", ram, batch_pattern_at(base, slot))[0]
            if pattern:
                out[slot] = pattern
    return out


def still_in_flight(ram, at_pause: dict) -> int:
    """How many of the batches in flight at the pause have neither completed
    nor been reaped (a reaped slot holds a new batch, with a new pattern)."""
    base = Mailbox(ram)["dma_base"]
    return sum(1 for slot, pattern in at_pause.items()
               if ram[batch_record(base, int(slot))] == 0
               and struct.unpack_from("<Q", ram, batch_pattern_at(base, int(slot)))[0] == pattern)
