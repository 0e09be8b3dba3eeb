"""The PCI function model (configuration space, BARs, capabilities, FLR) and the IOMMU model."""

import os
import struct

import pytest

from luvmm.devices.emu.dsa import DsaDevice
from luvmm.devices.emu.iommu import IOMMU_READ, IOMMU_WRITE, IommuDomain
from luvmm.devices.emu.memory import PhysMem
from luvmm.devices.emu.pci import MSIX_CAP_OFFSET
from luvmm.uapi.pci_regs import (
    PCI_BASE_ADDRESS_0,
    PCI_CAP_ID_EXP,
    PCI_CAP_ID_MSIX,
    PCI_CAPABILITY_LIST,
    PCI_CLASS_PROG,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_EXP_DEVCAP,
    PCI_EXP_DEVCAP_FLR,
    PCI_MSIX_FLAGS,
    PCI_MSIX_PBA,
    PCI_MSIX_TABLE,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
)


@pytest.fixture
def dsa():
    dev = DsaDevice("0000:6a:01.0")
    yield dev
    dev.shutdown()


def r16(dev, off):
    return struct.unpack("<H", dev.cfg_read(off, 2))[0]


def r32(dev, off):
    return struct.unpack("<I", dev.cfg_read(off, 4))[0]


def test_identity(dsa):
    assert (r16(dsa, 0), r16(dsa, 2)) == (0x8086, 0x0B25)
    assert int.from_bytes(dsa.cfg_read(PCI_CLASS_PROG, 3), "little") == 0x088000
    assert r16(dsa, PCI_STATUS) & PCI_STATUS_CAP_LIST


def test_capability_chain(dsa):
    caps = {}
    pos = dsa.cfg_read(PCI_CAPABILITY_LIST, 1)[0]
    while pos:
        cap_id, nxt = dsa.cfg_read(pos, 2)
        caps[cap_id] = pos
        pos = nxt
    assert set(caps) == {PCI_CAP_ID_EXP, PCI_CAP_ID_MSIX}
    assert r32(dsa, caps[PCI_CAP_ID_EXP] + PCI_EXP_DEVCAP) & PCI_EXP_DEVCAP_FLR
    msix = caps[PCI_CAP_ID_MSIX]
    assert r16(dsa, msix + PCI_MSIX_FLAGS) & 0x7FF == 8  # 9 vectors
    assert r32(dsa, msix + PCI_MSIX_TABLE) == 0x2000  # BAR 0, offset 0x2000
    assert r32(dsa, msix + PCI_MSIX_PBA) == 0x3000


def test_bar_sizing(dsa):
    for bar, size in ((0, 64 << 10), (2, 128 << 10)):
        off = PCI_BASE_ADDRESS_0 + 4 * bar
        flags = r32(dsa, off) & 0xF
        assert flags == 0xC  # 64-bit, prefetchable memory
        dsa.cfg_write(off, b"\xff" * 8)
        mask = struct.unpack("<Q", dsa.cfg_read(off, 8))[0] & ~0xF
        assert (~mask + 1) & 0xFFFFFFFFFFFFFFFF == size
        dsa.cfg_write(off, struct.pack("<Q", 0xFE000000))
        assert struct.unpack("<Q", dsa.cfg_read(off, 8))[0] == 0xFE000000 | flags


def test_read_only_bits_stay(dsa):
    dsa.cfg_write(0, b"\x00" * 4)
    assert r16(dsa, 0) == 0x8086
    dsa.cfg_write(PCI_COMMAND, struct.pack("<H", 0xFFFF))
    assert r16(dsa, PCI_COMMAND) == PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | 0x40 | 0x100 | PCI_COMMAND_INTX_DISABLE
    dsa.cfg_write(MSIX_CAP_OFFSET + PCI_MSIX_FLAGS, struct.pack("<H", 0))
    assert r16(dsa, MSIX_CAP_OFFSET + PCI_MSIX_FLAGS) == 8  # the table size is read-only
    with pytest.raises(ValueError):
        dsa.cfg_read(4095, 2)


def test_bar_bounds(dsa):
    with pytest.raises(ValueError):
        dsa.bar_read(0, 64 << 10, 4)
    with pytest.raises(ValueError):
        dsa.bar_read(1, 0, 4)  # BAR1 is the upper half of BAR0


# --- IOMMU -----------------------------------------------------------------------------------------

@pytest.fixture
def mem():
    fd = os.memfd_create("iommu-test", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 20)
    m = PhysMem(fd)
    yield m
    m.close()
    os.close(fd)


def test_map_translate_unmap(mem):
    d = IommuDomain()
    d.map(0x10000, mem, 0x4000, 0x3000)
    segs, fault = d.translate(0x11000, 0x1000, True)
    assert fault is None and segs == [(mem, 0x5000, 0x1000)]
    segs, fault = d.translate(0x12000, 0x3000, False)
    assert fault == 0x13000 and segs == [(mem, 0x6000, 0x1000)]
    with pytest.raises(FileExistsError):
        d.map(0x12000, mem, 0, 0x2000)
    with pytest.raises(ValueError):
        d.map(0x20001, mem, 0, 0x1000)
    assert d.unmap(0x11000, 0x1000) == 0x1000  # splits the mapping
    assert d.translate(0x11000, 1, False)[1] == 0x11000
    assert d.translate(0x12000, 1, False)[1] is None
    assert d.clear() == 0x2000


def test_permissions(mem):
    d = IommuDomain()
    d.map(0, mem, 0, 0x1000, IOMMU_READ)
    d.map(0x1000, mem, 0x1000, 0x1000, IOMMU_WRITE)
    assert d.translate(0, 8, False)[1] is None and d.translate(0, 8, True)[1] == 0
    assert d.translate(0x1000, 8, True)[1] is None and d.translate(0x1000, 8, False)[1] == 0x1000


def test_mapping_adds_no_seal_and_a_shrunk_file_faults(mem):
    """No seal is added to the memfd (a real kernel pins folios, it seals
    nothing: io_pagetable.c iopt_map_file_pages); pages the file loses to a
    shrink fault in the IOMMU instead of reaching past the file's end."""
    import fcntl

    assert not fcntl.fcntl(mem.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    d = IommuDomain()
    d.map(0, mem, 0, 0x2000)
    assert d.translate(0x1000, 8, False)[1] is None
    os.ftruncate(mem.fd, 0x1000)
    segments, fault = d.translate(0x800, 0x1000, False)
    assert fault == 0x1000 and sum(n for _, _, n in segments) == 0x800
