"""The guest's path to its device, under KVM: the BAR areas VFIO offers to
mmap are mapped into the guest (KVM memory slots) and its accesses to them
make no exit at all; what VFIO does not offer (areas outside the sparse
list, a BAR without mmap) traps and is served by the run loop in C; the
MSI-X table traps to the VMM, which virtualises it.

The device is a memfd standing for a VFIO device fd (``MemfdVfio``): the
host answers VFIO_DEVICE_GET_REGION_INFO for it as vfio-pci does -- region
N at N << VFIO_PCI_OFFSET_SHIFT, MMAP, a sparse-mmap capability through
the kernel's argsz protocol -- and the rest is the real kernel's: mmap and
pread/pwrite of the memfd.  The same path against a real vfio-pci device:
the lab (tests/lab/test_lab_real_host.py, QEMU's edu)."""

import os
import struct

import pytest

from luvmm.devices.vfio import VfioDevice
from luvmm.host import RealHost
from luvmm.uapi.kvm import KVM_EXIT_MMIO
from luvmm.uapi.pci_regs import PCI_CAP_ID_MSIX, PCI_CAPABILITY_LIST, PCI_STATUS, PCI_STATUS_CAP_LIST
from luvmm.uapi.vfio import (
    VFIO_DEVICE_GET_REGION_INFO,
    VFIO_PCI_OFFSET_SHIFT,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
)
from luvmm.vmm import guest
from luvmm.vmm.config import VmConfig
from luvmm.vmm.memory import GuestMemory
from luvmm.vmm.vm import Vm

BAR0_SIZE, BAR2_SIZE = 64 << 10, 128 << 10
#: BAR0's areas VFIO offers to mmap; the MSI-X table (0x2000) and PBA (0x3000) sit in the first.
SPARSE = [(0x0, 0x8000), (0xC000, 0x4000)]
CONFIG = 7 << VFIO_PCI_OFFSET_SHIFT


def region(index: int) -> int:
    return index << VFIO_PCI_OFFSET_SHIFT


class MemfdVfio(RealHost):
    """The running kernel, with one memfd answering as a vfio-pci device:
    a DSA's IDs and MSI-X capability in its config space, BAR0 mmap-able
    in the SPARSE areas, BAR2 (the portals) not mmap-able."""

    def __init__(self):
        self.fd = os.memfd_create("luvmm-test-vfio", os.MFD_CLOEXEC)
        cfg = bytearray(256)
        struct.pack_into("<HH", cfg, 0, 0x8086, 0x0B25)
        struct.pack_into("<H", cfg, PCI_STATUS, PCI_STATUS_CAP_LIST)
        cfg[PCI_CAPABILITY_LIST] = 0x40
        struct.pack_into("<BBHII", cfg, 0x40, PCI_CAP_ID_MSIX, 0, 9 - 1, 0x2000 | 0, 0x3000 | 0)
        os.pwrite(self.fd, bytes(cfg), CONFIG)
        self.region_info_calls = []

    def _ioctl(self, fd, request, arg, definition):
        if fd != self.fd or request != VFIO_DEVICE_GET_REGION_INFO:
            return super()._ioctl(fd, request, arg, definition)
        buf = memoryview(arg).cast("B")
        argsz, _, index = struct.unpack_from("<III", buf, 0)
        self.region_info_calls.append(argsz)
        size = {0: BAR0_SIZE, 2: BAR2_SIZE, 7: 256}.get(index, 0)
        flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE if size else 0
        caps = b""
        if index == 0:  # vfio_get_region_info: the caps follow the struct, or argsz says how much room they need
            flags |= VFIO_REGION_INFO_FLAG_MMAP
            caps = struct.pack("<HHIII", VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, 0, len(SPARSE), 0)
            caps += b"".join(struct.pack("<QQ", o, s) for o, s in SPARSE)
        cap_offset = 0
        if caps:
            flags |= VFIO_REGION_INFO_FLAG_CAPS
            if argsz < 32 + len(caps):
                argsz = 32 + len(caps)
            else:
                buf[32:32 + len(caps)] = caps
                cap_offset = 32
        struct.pack_into("<IIIIQQ", buf, 0, argsz, flags, index, cap_offset, size, region(index))
        return 0


def code(*parts: str) -> bytes:
    return b"".join(bytes.fromhex(p) for p in parts)


def d32(value: int) -> str:
    return struct.pack("<i", value).hex()


# rdi = BAR0, rsi = BAR2 (the portals).  The program stores and loads in
# mapped areas, in trapped ones, in the MSI-X table and to a portal; its
# last load is outside every BAR, which ends the test's run.
PROGRAM = code(
    "48b8" + struct.pack("<Q", 0x1111111111111111).hex(),  # movabs rax, 0x1111...
    "488987" + d32(0x0100),   # mov [rdi+0x100], rax      mapped (sparse area 1)
    "488987" + d32(0xC008),   # mov [rdi+0xC008], rax     mapped (sparse area 2)
    "488987" + d32(0x8010),   # mov [rdi+0x8010], rax     trapped: outside the sparse areas
    "488b9f" + d32(0x4000),   # mov rbx, [rdi+0x4000]     mapped load
    "48899f" + d32(0x4008),   # mov [rdi+0x4008], rbx     mapped
    "488b8f" + d32(0x3800),   # mov rcx, [rdi+0x3800]     trapped: the PBA's page, not the table
    "48898f" + d32(0x3810),   # mov [rdi+0x3810], rcx     (a trapped read's value, stored back)
    "898f" + d32(0x2000 + 0x10 * 3 + 8),  # mov [rdi+0x2038], ecx   the MSI-X table (vector 3's data)
    *["488986" + d32(8 * i) + "48ffc0" for i in range(8)],  # 8 x (mov [rsi+8i], rax; inc rax): a descriptor
    "488b8e" + d32(0xF0000),  # mov rcx, [rsi+0xF0000]    outside every BAR: back to the test
    "ebfe",                   # jmp $
)


@pytest.fixture
def vm(kvm_ok):
    host = MemfdVfio()
    vm = Vm(host, VmConfig("path", memory=32 << 20, guest="firmware"))
    vm.memory = GuestMemory.create("path", vm.config.memory)
    vm.device.dev = VfioDevice(host, host.fd)
    vm.device.kind = vm.device._identify()
    vm.device.plan_bars()
    vm.vcpus = vm.guest.boot(vm)
    vm.view[guest.FIRMWARE_GPA:guest.FIRMWARE_GPA + len(PROGRAM)] = PROGRAM
    regs = vm.vcpus[0].get_regs()
    regs.rdi, regs.rsi = guest.BAR0_GPA, guest.BAR2_GPA
    vm.vcpus[0].set_regs(regs)
    os.pwrite(host.fd, struct.pack("<Q", 0xFEEDFACECAFEBEEF), region(0) + 0x4000)
    os.pwrite(host.fd, struct.pack("<Q", 0x0123456789ABCDEF), region(0) + 0x3800)
    vm.guest.attach_device(vm)
    yield vm, host
    for vcpu in vm.vcpus:
        vcpu.close()
    vm.device.close()
    os.close(host.fd)


def test_mapped_bars_make_no_exit_and_the_rest_is_served_by_the_run_loop(vm):
    vm, host = vm
    dev = vm.device
    assert 32 + 16 + 16 * len(SPARSE) in host.region_info_calls  # asked again with the room the caps need
    bar0, bar2 = dev.bars
    # BAR0: the sparse areas, less the pages of the MSI-X table and PBA; BAR2: nothing (no MMAP).
    assert bar0.mapped == [(0x0, 0x2000), (0x4000, 0x8000), (0xC000, 0x10000)] and bar2.mapped == []
    assert bar0.trapped() == [(0x2000, 0x90, "vmm"), (0x2090, 0x1F70, "region"), (0x8000, 0x4000, "region")]
    assert bar2.trapped() == [(0, BAR2_SIZE, "portal")]
    assert dev.maps.slots == 3

    cpu = vm.vcpus[0]
    while True:
        assert vm.guest.step(vm, cpu), vm.runner.crash
        if dev.mmio_unhandled:  # the last load
            break
    dev_mem = lambda off, n: os.pread(host.fd, n, off)  # noqa: E731
    value = struct.pack("<Q", 0x1111111111111111)
    assert dev_mem(region(0) + 0x100, 8) == value and dev_mem(region(0) + 0xC008, 8) == value  # through the maps
    assert dev_mem(region(0) + 0x8010, 8) == value                                              # pwrite by the loop
    assert dev_mem(region(0) + 0x4008, 8) == struct.pack("<Q", 0xFEEDFACECAFEBEEF)
    assert dev_mem(region(0) + 0x3810, 8) == struct.pack("<Q", 0x0123456789ABCDEF)                # pread by the loop
    assert dev_mem(region(0) + 0x2038, 4) == bytes(4)  # the table is the VMM's: the device's stays untouched
    assert dev.msix_table.read(0x38, 4) == struct.pack("<I", 0x89ABCDEF)
    assert dev_mem(region(2), 64) == b"".join(struct.pack("<Q", 0x1111111111111111 + i) for i in range(8))

    counters = cpu.loop.counters()
    # Exits: 2 trapped stores and 1 trapped load in BAR0, 1 store to the table, 8 portal
    # stores, the last load.  The mapped accesses made none; two went to the VMM's
    # Python (the table, the last load).
    assert counters["exits"] == {KVM_EXIT_MMIO: 13} and counters["to_vmm"] == 2
    assert counters["portal_writes"] == 1
    assert {t["name"]: (t["reads"], t["writes"]) for t in counters["traps"]} == {
        "msix-table": (0, 0), "bar0": (1, 2), "portals": (0, 8)}
