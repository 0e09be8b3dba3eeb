"""Guest RAM: one memfd sealed against growing and shrinking, mapped into the
VMM, into KVM's memslots at GPA and into an IOAS at IOVA = GPA (the device
DMAs into the same pages the vCPUs use).  The memfd is what LUO preserves."""

from __future__ import annotations

import fcntl
import mmap
import os

from luvmm.abi import ffi, libc
from luvmm.vmm import guest

SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
# include/uapi/asm-generic/mman-common.h (Linux 5.14): fault the range in, writable.
MADV_POPULATE_WRITE = 23


def sealed_memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd


class GuestMemory:
    """The RAM memfd and its mapping in this process."""

    def __init__(self, memfd: int, size: int):
        self.memfd, self.size = memfd, size
        self.ram = mmap.mmap(memfd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        #: The guest's memory, GPA-indexed (below 4 GiB; RAM above is remapped, see guest.ram_ranges).
        self.view = memoryview(self.ram)
        self.addr = int(ffi.cast("uintptr_t", ffi.from_buffer(self.ram)))

    @classmethod
    def create(cls, name: str, size: int) -> GuestMemory:
        return cls(sealed_memfd(f"luvmm-{name}-ram", size), size)

    def populate(self, start: int, end: int) -> float:
        """Fault guest RAM [start, end) (GPA, below the MMIO hole) into this
        process's page tables (MADV_POPULATE_WRITE), before the guest runs.

        After a live update the pages are in the memfd, but the new VMM's
        mapping has no page-table entries for them, and a new KVM VM has no
        mappings of its own: each page the guest touches first costs KVM a
        fault that must also fault the host's mapping in (27 us a page on
        this project's KVM-PVM machine).  With the host's entries there,
        KVM resolves its fault on the fast path and maps the neighbouring
        pages with it: 3.8 us a page, an eighth of the faults.  Populating
        costs ~60 ns a page (1 ms for 16 MiB),
        so the restore does it for the range its guest uses at once, not
        for all of RAM.  Returns the seconds it took (0: not supported)."""
        import time

        start, end = max(0, start) & ~(mmap.PAGESIZE - 1), min(end, self.size, guest.LOW_RAM_LIMIT)
        if end <= start:
            return 0.0
        t0 = time.perf_counter()
        # Through cffi, which lets go of the GIL (mmap.madvise does not).
        if libc.madvise(ffi.cast("void *", self.addr + start), end - start, MADV_POPULATE_WRITE) < 0:
            return 0.0  # a kernel before 5.14: the guest faults its pages in, as it always did
        return time.perf_counter() - t0

    def ranges(self) -> list[tuple[int, int, int]]:
        """(GPA, offset in the memfd, length) of each RAM range."""
        return guest.ram_ranges(self.size)

    def map_into_kvm(self, vmfd) -> None:
        for slot, (gpa, off, length) in enumerate(self.ranges()):
            vmfd.set_user_memory_region(slot, gpa, length, self.addr + off)

    def map_into_ioas(self, iommufd, ioas: int) -> None:
        """IOMMU_IOAS_MAP_FILE of each range at IOVA = GPA: the device sees what the guest sees."""
        for gpa, off, length in self.ranges():
            iommufd.ioas_map_file(ioas, self.memfd, off, length, iova=gpa)
