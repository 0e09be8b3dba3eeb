"""The emulated IOMMU: per-domain translation from IOVA to (memory, offset).

A domain is the hardware page table of one HWPT (or of an IOAS's automatic
domain).  Mappings are page-granular with read/write permissions; the
engine asks for a translation of a whole buffer and gets the longest valid
prefix plus the first faulting address, so a DMA fault becomes a partial
completion (bytes_completed, fault_addr) in the completion record and never an
exception escaping the engine.

Domains are hardware state: they live in the machine, not in the emulated
kernel, and keep translating while the kernel that programmed them is
replaced by kexec, until somebody tears them down.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

from luvmm.devices.emu.memory import PhysMem

IOMMU_PAGE_SIZE = 4096
IOMMU_READ = 1
IOMMU_WRITE = 2


@dataclass(frozen=True)
class Extent:
    iova: int
    end: int  # exclusive
    mem: PhysMem
    offset: int  # of ``iova`` within ``mem``
    perms: int


class DmaFault(Exception):
    """A translation miss or permission violation at ``addr``."""

    def __init__(self, addr: int, write: bool):
        super().__init__(f"DMA {'write' if write else 'read'} fault at IOVA {addr:#x}")
        self.addr = addr
        self.write = write


class IommuDomain:
    """One IOMMU translation table."""

    def __init__(self, name: str = ""):
        self.name = name
        self._lock = threading.Lock()
        # (starts, extents), replaced as a whole on every change: translate()
        # runs in engine threads without the lock and needs a consistent pair.
        self._table: tuple[list[int], list[Extent]] = ([], [])
        # A one-entry IOTLB per direction (read, write): the last extent that
        # translated.  Flushed on every map and unmap.
        self._iotlb: list[Extent | None] = [None, None]
        #: Faults seen by devices translating through this domain.
        self.faults = 0

    # --- programming (the kernel side) -----------------------------------------------

    def map(self, iova: int, mem: PhysMem, offset: int, length: int, perms: int = IOMMU_READ | IOMMU_WRITE):
        if length <= 0 or (iova | offset | length) % IOMMU_PAGE_SIZE:
            raise ValueError("IOMMU mappings are whole pages")
        if offset + length > mem.size:
            raise ValueError("mapping beyond the end of the memory")
        if iova + length > 1 << 64:
            raise ValueError("IOVA beyond 64 bits")
        extent = Extent(iova, iova + length, mem, offset, perms)
        with self._lock:
            starts, extents = list(self._table[0]), list(self._table[1])
            i = bisect.bisect_left(starts, iova)
            if (i < len(extents) and extents[i].iova < extent.end) or (i > 0 and extents[i - 1].end > iova):
                raise FileExistsError(f"IOVA range {iova:#x}+{length:#x} overlaps a mapping")
            starts.insert(i, iova)
            extents.insert(i, extent)
            self._table = (starts, extents)
            self._iotlb = [None, None]

    def unmap(self, iova: int, length: int) -> int:
        """Remove every mapping inside ``[iova, iova+length)``; returns bytes unmapped."""
        end = iova + length
        with self._lock:
            extents = self._table[1]
            keep = [e for e in extents if e.end <= iova or e.iova >= end]
            split = [e for e in extents if not (e.end <= iova or e.iova >= end)]
            removed = 0
            for e in split:
                lo, hi = max(e.iova, iova), min(e.end, end)
                removed += hi - lo
                if e.iova < lo:
                    keep.append(Extent(e.iova, lo, e.mem, e.offset, e.perms))
                if hi < e.end:
                    keep.append(Extent(hi, e.end, e.mem, e.offset + (hi - e.iova), e.perms))
            keep.sort(key=lambda e: e.iova)
            self._iotlb = [None, None]
            self._table = ([e.iova for e in keep], keep)
            self._iotlb = [None, None]
        return removed

    def clear(self) -> int:
        return self.unmap(0, 1 << 64)

    def mappings(self) -> list[Extent]:
        return list(self._table[1])

    def memories(self) -> set[PhysMem]:
        return {e.mem for e in self._table[1]}

    # --- translation (the device side) -----------------------------------------------

    def translate(self, iova: int, length: int, write: bool) -> tuple[list[tuple[PhysMem, int, int]], int | None]:
        """Translate ``[iova, iova+length)``.

        Returns ``(segments, fault)``: the longest translatable prefix as
        ``(mem, offset, nbytes)`` segments, and the first IOVA that faults
        (``None`` when the whole range translates).
        """
        hit = self._iotlb[write]
        if hit is not None and hit.iova <= iova and iova + length <= hit.end:
            segments, fault = [(hit.mem, hit.offset + (iova - hit.iova), length)], None
        else:
            segments, fault = self._walk(iova, length, write)
        return self._backed(segments, iova, fault)

    def _backed(self, segments, iova: int, fault: int | None):
        """Cut the segments where the file behind them ends (it was shrunk
        under the mapping: no seal keeps it whole, see luvmm.devices.emu.memory)."""
        addr = iova
        for i, (mem, off, n) in enumerate(segments):
            have = mem.backed(off, n)
            if have < n:
                self.faults += fault is None
                return segments[:i] + ([(mem, off, have)] if have else []), addr + have
            addr += n
        return segments, fault

    def _walk(self, iova: int, length: int, write: bool):
        need = IOMMU_WRITE if write else IOMMU_READ
        segments = []
        addr, end = iova, iova + length
        starts, extents = self._table  # a consistent snapshot (replaced, never mutated)
        while addr < end:
            i = bisect.bisect_right(starts, addr) - 1
            if i < 0:
                break
            e = extents[i]
            if addr >= e.end or not e.perms & need:
                break
            n = min(end, e.end) - addr
            segments.append((e.mem, e.offset + (addr - e.iova), n))
            addr += n
            self._iotlb[write] = e
        if addr < end:
            self.faults += 1
            return segments, addr
        return segments, None

    def read(self, iova: int, length: int) -> bytes:
        """Read a whole range or raise DmaFault (descriptor lists, small operands)."""
        segments, fault = self.translate(iova, length, False)
        if fault is not None:
            raise DmaFault(fault, False)
        if len(segments) == 1:
            mem, off, n = segments[0]
            return bytes(mem.view[off:off + n])
        return b"".join(bytes(mem.view[off:off + n]) for mem, off, n in segments)

    def write(self, iova: int, data: bytes) -> None:
        """Write a whole range or raise DmaFault (completion records); nothing
        is written when any part faults."""
        segments, fault = self.translate(iova, len(data), True)
        if fault is not None:
            raise DmaFault(fault, True)
        pos = 0
        for mem, off, n in segments:
            mem.view[off:off + n] = data[pos:pos + n]
            pos += n
