"""The guest: physical memory layout, the firmware image and the mailbox.

Guest-physical map (IOVA = GPA for the device):

    0x0000_1000  page tables (identity map of the low 4 GiB, 2 MiB pages, user-accessible)
    0x0000_8000  mailbox page (vmm/firmware/mailbox.h)
    0x0001_0000  firmware image (vmm/firmware/fw.bin)
    0x0008_0000  the pace ring (64 KiB: the guest's record of its own progress)
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
#: An OUT to this port: the firmware asks the VMM to wait for its device's interrupt (mailbox.h).
LUVMM_PORT_WAIT_IRQ = 0x0500
#: How long the VMM waits for it at most: short, so that a pause is never held longer.
IRQ_WAIT_S = 0.002
MIN_MEMORY = 32 << 20

# struct mailbox, field by field (u64 each).
MAILBOX_FIELDS = ("magic", "bar0", "bar2", "dma_base", "slots", "pairs", "xfer", "init_device",
                  "state", "heartbeat", "submitted", "completed", "descs_ok", "errors", "verify_failures",
                  "last_error", "inflight", "init_error", "recoveries")
AUX_HEARTBEAT = len(MAILBOX_FIELDS) * 8
AUX_SLOTS = 16
#: After aux_heartbeat[16], so that no counter's offset moved when they came: the first
#: four written by the VMM, the last two by the guest.
MAILBOX_TAIL_FIELDS = ("driver", "device_resets", "tsc_mult", "pace_period_ns", "pace_head", "movdir64b")
#: The mailbox's ``driver``: which device the firmware drives.
DRIVERS = {"dsa": 0, "edu": 1}
GUEST_STATE = {0: "not started", 1: "initialising", 2: "running", 3: "device error"}


#: The guest's pace ring (mailbox.h): (ns, heartbeat) every pace_period_ns.
PACE_RING_GPA = 0x80000
PACE_RING_ENTRIES = 4096
PACE_PERIOD_NS = 1_000_000


def offset(field: str) -> int:
    if field in MAILBOX_TAIL_FIELDS:
        return MAILBOX_GPA + AUX_HEARTBEAT + 8 * (AUX_SLOTS + MAILBOX_TAIL_FIELDS.index(field))
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


def working_set(slots: int, pairs: int, xfer: int) -> list[tuple[int, int]]:
    """The GPA ranges the firmware touches as it runs: its page tables,
    mailbox, image, pace ring and stacks, its DMA area's records and lists,
    and each slot's buffers -- ``pairs`` of its 16 pairs (fw.c: buffer()) --
    merged where they touch.  The restore faults them in as it rebuilds the
    VM (luvmm.vmm.memory.GuestMemory.populate)."""
    buffers = DMA_BASE + 0x100000
    ranges = [(0, buffers)]
    for s in range(slots):
        start = buffers + s * MAX_PAIRS * 2 * xfer
        ranges.append((start, start + pairs * 2 * xfer))
    merged: list[tuple[int, int]] = []
    for start, end in ranges:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def load_firmware(ram: memoryview, *, slots: int, pairs: int, xfer: int, init_device: bool = True,
                  driver: str = "dsa") -> None:
    with open(FIRMWARE, "rb") as f:
        image = f.read()
    ram[FIRMWARE_GPA:FIRMWARE_GPA + len(image)] = image
    mb = Mailbox(ram)
    for field, value in (("magic", MAILBOX_MAGIC), ("bar0", BAR0_GPA), ("bar2", BAR2_GPA), ("dma_base", DMA_BASE),
                         ("slots", slots), ("pairs", pairs), ("xfer", xfer), ("init_device", int(init_device)),
                         ("driver", DRIVERS[driver])):
        mb[field] = value


def tsc_mult(hz: float | None) -> int:
    """The mailbox's ``tsc_mult`` for a TSC of ``hz``: ns = TSC * tsc_mult >> 32 (0: no stamps)."""
    return int((10**9 << 32) / hz) if hz else 0


def tsc_ns(tsc: int, mult: int) -> int:
    """A TSC value on the guest's clock (ns), as the firmware converts its own."""
    return (tsc * mult) >> 32


def pace_ring(ram) -> list[tuple[int, int]]:
    """The guest's pace ring, oldest first: [(ns, heartbeat)] -- what its
    driver recorded of its own progress (mailbox.h), [] if it keeps none.
    The oldest slot may be the one being written: it is left out."""
    head = Mailbox(ram)["pace_head"]
    count = min(head, PACE_RING_ENTRIES - 1)
    out = []
    for i in range(head - count, head):
        out.append(struct.unpack_from("<QQ", ram, PACE_RING_GPA + 16 * (i % PACE_RING_ENTRIES)))
    return out


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


# --- QEMU's edu: its driver's record at DMA_BASE (struct edu_record in mailbox.h) -------------
# Both guests' edu drivers keep it -- the firmware's (fw.c) and the synthetic
# guest's (vmm/synthetic_edu.py) -- and the VMM reads it the same way: what is
# in flight at a pause, the transfers redone after a device reset, and the
# stamps of the heartbeat and of each completion (ns; their gaps are what a
# real host measures with no observer on its bus).

EDU_RECORD_FIELDS = ("seq_in_flight", "phase", "redone", "last_heartbeat_ns", "max_heartbeat_gap_ns",
                     "last_completion_ns", "max_completion_gap_ns")
EDU_IDLE, EDU_TO_DEVICE, EDU_FROM_DEVICE = 0, 1, 2
EDU_SRC_OFFSET, EDU_DST_OFFSET = 0x1000, 0x2000
#: Bytes per transfer: strictly inside the device's 4 KiB buffer.
EDU_XFER = 2048


class EduRecord:
    """The edu driver's record, seen through a view of guest RAM."""

    def __init__(self, ram):
        self.ram = ram

    @staticmethod
    def offset(field: str) -> int:
        return DMA_BASE + 8 * EDU_RECORD_FIELDS.index(field)

    def __getitem__(self, field: str) -> int:
        return struct.unpack_from("<Q", self.ram, self.offset(field))[0]

    def __setitem__(self, field: str, value: int) -> None:
        struct.pack_into("<Q", self.ram, self.offset(field), value & (1 << 64) - 1)

    def snapshot(self) -> dict[str, int]:
        return dict(zip(EDU_RECORD_FIELDS, struct.unpack_from(f"<{len(EDU_RECORD_FIELDS)}Q", self.ram, DMA_BASE)))


def edu_in_flight(ram) -> dict[int, int]:
    """{0: the transfer's sequence number} while one is in flight, else {}."""
    seq = EduRecord(ram)["seq_in_flight"]
    return {0: seq} if seq and Mailbox(ram)["state"] == 2 else {}


def edu_still_in_flight(ram, at_pause: dict) -> int:
    """1 if the transfer in flight at the pause has not completed since."""
    seq = EduRecord(ram)["seq_in_flight"]
    return sum(1 for s in at_pause.values() if int(s) == seq)
