"""Physical memory of the emulated machine: the memfds it was handed.

A real IOMMU translates to physical pages; the emulated one translates to a
(memfd, offset) pair.  The machine maps each memfd once, MAP_SHARED, so a DMA
write by the device is the same byte the guest (which maps the same memfd)
reads.  The mapping holds the machine's own dup of the fd: pages stay alive
as long as a translation points at them, as pinned pages do, whatever the
process that handed the fd over does afterwards -- with one difference: no
seal is added to the caller's memfd (a real kernel adds none, it pins the
folios), so if the file is shrunk under a mapping the pages past its new end
are gone; the IOMMU then faults there (:meth:`PhysMem.backed`) instead of
the machine touching a mapping past the end of its file (SIGBUS).
"""

from __future__ import annotations

import ctypes
import mmap
import os


class PhysMem:
    """One memfd mapped into the machine."""

    def __init__(self, fd: int):
        size = os.fstat(fd).st_size
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(f"memory of {size} bytes is not a whole number of pages")
        self.fd = os.dup(fd)
        self.size = size
        self.map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._anchor = ctypes.c_char.from_buffer(self.map)
        #: The mapping's address, for GIL-free copies with ctypes.memmove.
        self.address = ctypes.addressof(self._anchor)
        #: A byte view of the whole memory.
        self.view = memoryview(self.map)
        st = os.fstat(self.fd)
        self.key = (st.st_dev, st.st_ino)

    def backed(self, offset: int, length: int) -> int:
        """How many bytes from ``offset`` (up to ``length``) the file still has."""
        return max(0, min(length, os.fstat(self.fd).st_size - offset))

    def close(self) -> None:
        if self.view is None:
            return
        self.view.release()
        self.view = None
        del self._anchor
        self.map.close()
        os.close(self.fd)

    def __repr__(self) -> str:
        return f"<PhysMem inode={self.key[1]} {self.size >> 20} MiB>"
