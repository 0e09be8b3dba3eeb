"""The passed-through function's BARs in guest-physical space: what is
mapped into the guest and what traps.

As QEMU's vfio-pci and Cloud Hypervisor's VFIO device do, every BAR area
VFIO offers to mmap (``VFIO_REGION_INFO_FLAG_MMAP``, narrowed to the
``VFIO_REGION_INFO_CAP_SPARSE_MMAP`` areas where the kernel lists them) is
mmapped from the device fd and given to KVM as a memory slot: the guest's
loads and stores reach the device with no exit at all.  What cannot be
mapped traps, and the vCPU run loop in C (vmm/runloop.c) serves it without
the VMM's Python:

* the MSI-X table, which the VMM virtualises (the pages that hold it and the
  PBA are never mapped, as in QEMU's ``vfio_pci_fixup_msix_region``): its
  accesses go to :class:`MsixTable`, in Python -- a guest writes it when it
  sets its interrupts up, not in its steady state;
* a DSA's portals that are not mapped: the run loop combines a descriptor's
  stores into one 64-byte write (what MOVDIR64B does on real hardware);
* every other unmapped byte: the VFIO region at the same offset.

A real DSA's portal takes only 64-byte MOVDIR64B/ENQCMD writes and
vfio-pci's region path splits a write into <=8-byte stores, so a real DSA
can only be driven through a mapped portal; the emulated host offers mmap
only where its device model can serve memory semantics faithfully (none of
its DSA's BARs: a portal mapped into memory would see a descriptor stored
as eight quadwords by a CPU without MOVDIR64B, torn).
"""

from __future__ import annotations

import mmap as _mmap
import struct

from luvmm.abi import ffi
from luvmm.uapi.pci_regs import (
    PCI_CAP_ID_MSIX,
    PCI_CAP_LIST_NEXT,
    PCI_CAPABILITY_LIST,
    PCI_MSIX_ENTRY_CTRL_MASKBIT,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_ENTRY_VECTOR_CTRL,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_QSIZE,
    PCI_MSIX_PBA,
    PCI_MSIX_PBA_BIR,
    PCI_MSIX_PBA_OFFSET,
    PCI_MSIX_TABLE,
    PCI_MSIX_TABLE_BIR,
    PCI_MSIX_TABLE_OFFSET,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
)
from luvmm.vmm import runloop
from luvmm.vmm.runloop import TRAP_PORTAL, TRAP_REGION, TRAP_VMM, XPORT_POSTED, XPORT_PREADWRITE, Trap

PAGE_SIZE = _mmap.PAGESIZE
#: KVM memory slots of mapped BAR areas start here (guest RAM has the ones below).
BAR_SLOT_BASE = 8


def _page_down(x: int) -> int:
    return x & ~(PAGE_SIZE - 1)


def _page_up(x: int) -> int:
    return (x + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def subtract(areas: list[tuple[int, int]], hole: tuple[int, int]) -> list[tuple[int, int]]:
    """``areas`` ([start, end) pairs) without ``hole``."""
    out = []
    for start, end in areas:
        if hole[1] <= start or end <= hole[0]:
            out.append((start, end))
            continue
        if start < hole[0]:
            out.append((start, hole[0]))
        if hole[1] < end:
            out.append((hole[1], end))
    return out


class MsixLocation:
    """Where the function's MSI-X capability puts its table and PBA."""

    __slots__ = ("vectors", "table_bar", "table_offset", "pba_bar", "pba_offset")

    def __init__(self, vectors: int, table_bar: int, table_offset: int, pba_bar: int, pba_offset: int):
        self.vectors, self.table_bar, self.table_offset = vectors, table_bar, table_offset
        self.pba_bar, self.pba_offset = pba_bar, pba_offset

    @property
    def table_size(self) -> int:
        return self.vectors * PCI_MSIX_ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return (self.vectors + 63) // 64 * 8


def find_msix(config: bytes) -> MsixLocation | None:
    """The MSI-X capability, found by walking the capability list of the
    function's config space (its first 256 bytes, read at once: on the
    emulated host each read is a round trip, and this is the restore's
    path); None if the function has none."""
    if len(config) < 64 or not struct.unpack_from("<H", config, PCI_STATUS)[0] & PCI_STATUS_CAP_LIST:
        return None
    pos, seen = config[PCI_CAPABILITY_LIST] & ~3, set()
    while pos and pos not in seen and pos + 12 <= len(config):
        seen.add(pos)
        if config[pos] == PCI_CAP_ID_MSIX:
            flags = struct.unpack_from("<H", config, pos + PCI_MSIX_FLAGS)[0]
            table, pba = struct.unpack_from("<II", config, pos + PCI_MSIX_TABLE)
            assert PCI_MSIX_PBA == PCI_MSIX_TABLE + 4
            return MsixLocation((flags & PCI_MSIX_FLAGS_QSIZE) + 1, table & PCI_MSIX_TABLE_BIR,
                                table & PCI_MSIX_TABLE_OFFSET, pba & PCI_MSIX_PBA_BIR, pba & PCI_MSIX_PBA_OFFSET)
        pos = config[pos + PCI_CAP_LIST_NEXT] & ~3
    return None


class MsixTable:
    """The guest's MSI-X table, virtualised by the VMM as QEMU does: the
    guest programs its vectors here; the host's vectors are the VMM's own
    (eventfds through VFIO_DEVICE_SET_IRQS).  Every vector starts masked."""

    def __init__(self, vectors: int):
        self.table = bytearray(vectors * PCI_MSIX_ENTRY_SIZE)
        for v in range(vectors):
            self.table[v * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL] = PCI_MSIX_ENTRY_CTRL_MASKBIT
        self.writes = 0

    def read(self, off: int, length: int) -> bytes:
        return bytes(self.table[off:off + length]).ljust(length, b"\xff")

    def write(self, off: int, data: bytes) -> None:
        if 0 <= off and off + len(data) <= len(self.table):
            self.table[off:off + len(data)] = data
            self.writes += 1


class GuestBar:
    """One BAR as the guest sees it: at ``gpa``, ``size`` bytes (the
    region's); ``mapped`` the [start, end) ranges mmapped into KVM, the rest
    trapped (``traps``)."""

    def __init__(self, name: str, index: int, gpa: int, region, portal: bool = False):
        self.name, self.index, self.gpa, self.region, self.portal = name, index, gpa, region, portal
        self.size = region.size
        self.mapped: list[tuple[int, int]] = []
        self.traps: list[Trap] = []

    def trapped(self) -> list[tuple[int, int, str]]:
        """(offset, size, how) of every unmapped range: "vmm" (the VMM's
        Python: the MSI-X table), or how the BAR's trap serves the rest
        ("region", "portal"; "vmm" where the run loop cannot reach the device)."""
        rest = [(0, self.size)]
        for area in self.mapped:
            rest = subtract(rest, area)
        table = next((t for t in self.traps if t.name == "msix-table"), None)
        whole = runloop.TRAP_KINDS[self.traps[-1].kind]
        out = []
        for start, end in rest:
            pieces = [(start, end)]
            if table is not None:
                lo, hi = max(start, table.gpa - self.gpa), min(end, table.gpa - self.gpa + table.size)
                if lo < hi:
                    out.append((lo, hi - lo, "vmm"))
                    pieces = subtract(pieces, (lo, hi))
            out += [(a, b - a, whole) for a, b in pieces]
        return sorted(out)

    def describe(self) -> dict:
        """What `luvmm vm status` shows of the BAR."""
        return {"bar": self.index, "name": self.name, "gpa": self.gpa, "size": self.size, "mmap": self.region.mmap,
                "mapped": [[start, end - start] for start, end in self.mapped],
                "mapped_bytes": sum(end - start for start, end in self.mapped),
                "trapped": [[off, size, how] for off, size, how in self.trapped()]}


def plan(bars: list[GuestBar], msix: MsixLocation | None, *, fd: int, access: tuple[str, int]) -> MsixTable | None:
    """Decide, for each BAR, what is mapped and what traps (and how a trap
    reaches the device: ``access`` is the host's answer for the device fd,
    :meth:`luvmm.host.Host.region_access`).  Returns the virtual MSI-X table."""
    kind, op = access
    transport = {"syscall": XPORT_PREADWRITE, "wire": XPORT_POSTED}.get(kind)
    table = MsixTable(msix.vectors) if msix is not None else None
    for bar in bars:
        region = bar.region
        holes = []
        if msix is not None:
            for bir, off, size in ((msix.table_bar, msix.table_offset, msix.table_size),
                                   (msix.pba_bar, msix.pba_offset, msix.pba_size)):
                if bir == bar.index:
                    holes.append((_page_down(off), _page_up(off + size)))
        mapped = []
        if fd >= 0 and transport is not None:
            for off, size in region.mmap_areas:
                start, end = _page_up(off), _page_down(off + size)  # KVM maps whole pages
                if start < end:
                    mapped.append((start, end))
        for hole in holes:
            mapped = subtract(mapped, hole)
        bar.mapped = sorted(mapped)
        traps = []
        if msix is not None and msix.table_bar == bar.index:
            traps.append(Trap(bar.gpa + msix.table_offset, msix.table_size, TRAP_VMM, name="msix-table"))
        # One trap over the whole BAR serves every byte not mapped (a mapped
        # byte never exits); the MSI-X table's trap comes first and wins.
        if transport is None:
            traps.append(Trap(bar.gpa, bar.size, TRAP_VMM, name=bar.name))
        else:
            traps.append(Trap(bar.gpa, bar.size, TRAP_PORTAL if bar.portal else TRAP_REGION, fd=fd,
                              offset=region.offset, transport=transport, wire_op=op, name=bar.name))
        bar.traps = traps
    return table


class BarMaps:
    """The mmaps of the mapped areas and their KVM slots (one VM's)."""

    def __init__(self):
        self.maps: list[tuple[object, object]] = []  # (mmap, cffi buffer pinning it)
        self.slots = 0

    def install(self, host, vmfd, fd: int, bars: list[GuestBar]) -> None:
        slot = BAR_SLOT_BASE
        for bar in bars:
            for start, end in bar.mapped:
                area = host.mmap(fd, end - start, bar.region.offset + start)
                pin = ffi.from_buffer(area)
                self.maps.append((area, pin))
                vmfd.set_user_memory_region(slot, bar.gpa + start, end - start, int(ffi.cast("uintptr_t", pin)))
                slot += 1
        self.slots = slot - BAR_SLOT_BASE

    def close(self) -> None:
        for area, pin in self.maps:
            ffi.release(pin)
            area.close()
        self.maps = []
        self.slots = 0
