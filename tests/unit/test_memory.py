"""Guest RAM: a restored VMM maps the memfd anew, and faults the guest's
working set into its page tables before the guest runs (so that KVM's first
faults on it take the fast path).  Read from /proc/self/pagemap: bit 63 of a
page's entry says whether this process maps it."""

import mmap
import os
import struct

from luvmm.vmm import guest
from luvmm.vmm.memory import GuestMemory


def mapped(memory: GuestMemory, gpa: int) -> bool:
    with open("/proc/self/pagemap", "rb") as f:
        f.seek((memory.addr + gpa) // mmap.PAGESIZE * 8)
        return bool(struct.unpack("<Q", f.read(8))[0] >> 63)


def test_populate_maps_the_working_set_and_nothing_else():
    first = GuestMemory.create("pop", 8 << 20)
    first.view[:] = b"\x5a" * len(first.view)  # the pages exist in the memfd, as after a live update
    restored = GuestMemory(os.dup(first.memfd), first.size)  # a new VMM's mapping: no page mapped yet
    assert not mapped(restored, 0x200000) and not mapped(restored, 0x500000)
    assert restored.populate(0x200000, 0x300000) > 0
    assert all(mapped(restored, gpa) for gpa in range(0x200000, 0x300000, mmap.PAGESIZE))
    assert not mapped(restored, 0x500000) and restored.view[0x2FF000] == 0x5A  # the memfd's pages, not new ones


def test_the_firmware_working_set_is_its_buffers_not_its_reservation():
    ranges = guest.working_set(slots=32, pairs=4, xfer=16 << 10)
    buffers = 4 * 2 * (16 << 10)  # a slot's: 4 pairs of a source and a destination
    # Tables, mailbox, image, pace ring, stacks, records and lists -- and slot 0's buffers, right after.
    assert ranges[0] == (0, guest.DMA_BASE + 0x100000 + buffers)
    assert len(ranges) == 32 and all(end - start == buffers for start, end in ranges[1:])
    assert sum(end - start for start, end in ranges) < guest.workload_bytes(32, 4, 16 << 10) // 2
