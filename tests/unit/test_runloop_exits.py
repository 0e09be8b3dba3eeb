"""What the vCPU run loop in C (vmm/runloop.c) does with the exits it
serves, one exit at a time (``RunLoop.serve`` on a kvm_run filled in as KVM
fills it): portal stores combined into whole descriptors and nothing torn
through a pause, MOVDIR64B decoded and done as one write, a region trap's
accesses at the region's offset, the wire header of a posted write.  The
same loop under KVM, a guest driving it: tests/unit/test_guest_path.py."""

import os
import struct

import pytest

from luvmm.abi import ffi as abi_ffi
from luvmm.uapi.kvm import (
    KVM_EXIT_HLT,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_MMIO,
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
)
from luvmm.wire import OP_PWRITE_POSTED, REQUEST
from luvmm.vmm import guest, runloop
from luvmm.vmm.machine_state import GuestState
from luvmm.vmm.runloop import SERVED, TRAP_PORTAL, TRAP_REGION, TRAP_VMM, RunLoop, Trap
from luvmm.vmm.x86 import identity_page_tables

PORTAL = guest.BAR2_GPA


class Exits:
    """A struct kvm_run of our own, filled in as KVM leaves it at an exit."""

    def __init__(self, vcpu_fd: int = -1):
        self.buf = bytearray(abi_ffi.sizeof("struct kvm_run"))
        self.run = abi_ffi.from_buffer("struct kvm_run *", self.buf)
        self.loop = RunLoop(vcpu_fd, int(abi_ffi.cast("uintptr_t", self.run)))

    def store(self, addr: int, data: bytes) -> int:
        self.run.exit_reason = KVM_EXIT_MMIO
        self.run.mmio.phys_addr, self.run.mmio.len, self.run.mmio.is_write = addr, len(data), 1
        abi_ffi.memmove(self.run.mmio.data, data, len(data))
        return self.loop.serve()

    def load(self, addr: int, length: int) -> tuple[int, bytes]:
        self.run.exit_reason = KVM_EXIT_MMIO
        self.run.mmio.phys_addr, self.run.mmio.len, self.run.mmio.is_write = addr, length, 0
        abi_ffi.memmove(self.run.mmio.data, b"\xaa" * 8, 8)
        served = self.loop.serve()
        return served, bytes(self.run.mmio.data)[:length]


@pytest.fixture
def device():
    """A device fd the loop reaches with pread/pwrite: a memfd, its BAR2 at the VFIO offset of index 2."""
    fd = os.memfd_create("luvmm-test-device", os.MFD_CLOEXEC)
    yield fd
    os.close(fd)


def portal_trap(fd: int) -> Trap:
    return Trap(PORTAL, 128 << 10, TRAP_PORTAL, fd=fd, offset=2 << 40, name="portals")


def test_portal_stores_combine_into_one_write_and_a_pause_between_them_loses_nothing(device):
    exits = Exits()
    exits.loop.configure([portal_trap(device)])
    desc = os.urandom(64)
    for i in range(5):  # the guest is paused after five of its eight stores
        assert exits.store(PORTAL + 0x4000 + 8 * i, desc[8 * i:8 * i + 8]) == SERVED
    assert os.fstat(device).st_size == 0  # nothing reached the device: no torn descriptor
    held = exits.loop.portal_state()
    saved = GuestState({}, portal={"0": [held[0].hex(), held[1], held[2]]}).to_dict()  # machine state, and back
    restored = Exits()  # the restored VMM's loop
    restored.loop.configure([portal_trap(device)])
    restored.loop.set_portal_state(*GuestState.from_dict(saved).portal_buffers()[0])
    for i in range(5, 8):
        assert restored.store(PORTAL + 0x4000 + 8 * i, desc[8 * i:8 * i + 8]) == SERVED
    assert os.pread(device, 64, (2 << 40) + 0x4000) == desc
    assert os.fstat(device).st_size == (2 << 40) + 0x4040  # one 64-byte write, nothing else
    # A descriptor that starts over a half-written one replaces it, never mixes with it.
    other = os.urandom(64)
    restored.store(PORTAL + 0x4000, b"x" * 8)
    for i in range(8):
        restored.store(PORTAL + 0x4000 + 8 * i, other[8 * i:8 * i + 8])
    assert os.pread(device, 64, (2 << 40) + 0x4000) == other
    assert restored.loop.counters()["portal_writes"] == 2 and restored.loop.portal_state() is None
    # A store across two portal lines is dropped, as the device would; a read of a portal is zero.
    restored.store(PORTAL + 0x8038, b"y" * 16)
    assert restored.loop.portal_state() is None
    assert restored.load(PORTAL + 0x40, 8) == (SERVED, bytes(8))


def test_a_region_trap_reads_and_writes_the_region_at_its_offset(device):
    exits = Exits()
    exits.loop.configure([Trap(guest.BAR0_GPA + 0x2000, 0x1000, TRAP_VMM, name="msix-table"),
                          Trap(guest.BAR0_GPA, 64 << 10, TRAP_REGION, fd=device, offset=0)])
    assert exits.store(guest.BAR0_GPA + 0xA0, struct.pack("<I", 0x5 << 20)) == SERVED
    assert os.pread(device, 4, 0xA0) == struct.pack("<I", 0x5 << 20)
    os.pwrite(device, b"\x01\x02\x03\x04", 0x90)
    assert exits.load(guest.BAR0_GPA + 0x90, 4) == (SERVED, b"\x01\x02\x03\x04")
    # The MSI-X table is the VMM's (its trap comes first); outside every trap, too.
    assert exits.store(guest.BAR0_GPA + 0x2000, b"\0" * 4) == KVM_EXIT_MMIO
    assert exits.load(guest.BAR0_GPA + (64 << 10), 4)[0] == KVM_EXIT_MMIO
    counters = exits.loop.counters()
    assert counters["exits"] == {KVM_EXIT_MMIO: 4} and counters["to_vmm"] == 2
    assert counters["traps"][1] == {"name": "region", "reads": 1, "writes": 1}


def test_on_the_emulated_host_a_write_is_posted_whole_and_a_read_is_the_vmms():
    import socket

    here, daemon = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with here, daemon:
        exits = Exits()
        exits.loop.configure([Trap(PORTAL, 128 << 10, TRAP_PORTAL, fd=here.fileno(), offset=2 << 40,
                                   transport=runloop.XPORT_POSTED, wire_op=OP_PWRITE_POSTED),
                              Trap(guest.BAR0_GPA, 64 << 10, TRAP_REGION, fd=here.fileno(), offset=0,
                                   transport=runloop.XPORT_POSTED, wire_op=OP_PWRITE_POSTED)])
        desc = os.urandom(64)
        for i in range(8):
            assert exits.store(PORTAL + 8 * i, desc[8 * i:8 * i + 8]) == SERVED
        msg = daemon.recv(4096)
        assert msg == REQUEST.pack(OP_PWRITE_POSTED, 64, 2 << 40, 0) + desc  # luvmm.wire's header, one message
        assert exits.store(guest.BAR0_GPA + 0x88, b"\x01\0\0\0") == SERVED
        assert daemon.recv(4096) == REQUEST.pack(OP_PWRITE_POSTED, 4, 0x88, 0) + b"\x01\0\0\0"
        assert exits.load(guest.BAR0_GPA + 0x90, 4)[0] == KVM_EXIT_MMIO  # needs the reply: the VMM's
    assert runloop.wire_header(OP_PWRITE_POSTED, 8, 0x1234) == REQUEST.pack(OP_PWRITE_POSTED, 8, 0x1234, 0)


def regs(**values) -> bytes:
    r = abi_ffi.new("struct kvm_regs *")
    r.rip = 0x10000
    for name, value in values.items():
        setattr(r, name, value)
    return bytes(abi_ffi.buffer(r))


@pytest.mark.parametrize("insn,r,expected", [
    # movdir64b rax, [rsi]
    (bytes.fromhex("660f38f806"), dict(rax=0xFE100000, rsi=0x300000), (0xFE100000, 0x300000, 5)),
    # movdir64b rdx, [rbx + 0x40]
    (bytes.fromhex("660f38f85340"), dict(rdx=0xFE104000, rbx=0x300000), (0xFE104000, 0x300040, 6)),
    # movdir64b r9, [r12 + rcx*8 + 0x1000]  (REX.RB, SIB, disp32)
    (bytes.fromhex("66450f38f88ccc00100000"), dict(r9=0xFE100000, r12=0x200000, rcx=2),
     (0xFE100000, 0x201010, 11)),
    # movdir64b rax, [rip + 0x100]
    (bytes.fromhex("660f38f80500010000"), dict(rax=0xFE100000), (0xFE100000, 0x10000 + 9 + 0x100, 9)),
    # movdir64b rbp, [rsp + 8]  (SIB without index)
    (bytes.fromhex("660f38f86c2408"), dict(rbp=0xFE100040, rsp=0x1FFF00), (0xFE100040, 0x1FFF08, 7)),
])
def test_movdir64b_decode(insn, r, expected):
    assert runloop.movdir64b_decode(insn + b"\x90" * 4, regs(**r)) == expected


def test_movdir64b_decode_refuses_other_instructions():
    for insn in (bytes.fromhex("0f38f806"), bytes.fromhex("660f38f9c0"), bytes.fromhex("660f38f8c0"),
                 bytes.fromhex("660f38")):
        assert runloop.movdir64b_decode(insn, regs()) is None


def test_page_walk_over_the_guest_tables():
    ram = bytearray(8 << 20)
    cr3 = identity_page_tables(ram, 0x1000, 4 << 30)
    exits = Exits()
    pin = abi_ffi.from_buffer(ram)
    exits.loop.configure([], ram=[(0, len(ram), int(abi_ffi.cast("uintptr_t", pin)))])
    assert exits.loop.translate(cr3, 0x345678) == 0x345678
    assert exits.loop.translate(cr3, 1 << 40) is None


def test_a_movdir64b_kvm_could_not_emulate_is_one_portal_write_and_rip_steps_over_it(kvm_ok, device):
    from luvmm.vmm.kvm import Kvm

    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        ram = bytearray(8 << 20)
        cr3 = identity_page_tables(ram, guest.PAGE_TABLES_GPA, 4 << 30)
        desc = os.urandom(64)
        ram[0x300FE0:0x301020] = desc  # across a page boundary
        sregs = vcpu.get_sregs()
        sregs.cr3 = cr3
        vcpu.set_sregs(sregs)
        r = vcpu.get_regs()
        r.rip, r.rax, r.rsi = 0x10000, PORTAL + 0x4000, 0x300FE0
        vcpu.set_regs(r)
        exits = Exits(vcpu.fd)
        pin = abi_ffi.from_buffer(ram)
        exits.loop.configure([portal_trap(device)], ram=[(0, len(ram), int(abi_ffi.cast("uintptr_t", pin)))])
        insn = bytes.fromhex("660f38f806")  # movdir64b rax, [rsi]
        run = exits.run
        run.exit_reason = KVM_EXIT_INTERNAL_ERROR
        failure = run.emulation_failure
        failure.suberror, failure.flags = KVM_INTERNAL_ERROR_EMULATION, \
            KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
        failure.insn_size = len(insn)
        abi_ffi.memmove(failure.insn_bytes, insn, len(insn))
        assert exits.loop.serve() == SERVED
        assert os.pread(device, 64, (2 << 40) + 0x4000) == desc
        assert vcpu.get_regs().rip == 0x10000 + len(insn)
        assert exits.loop.counters()["movdir64b"] == 1
        # Not a MOVDIR64B: the guest's end, the VMM's to report.
        abi_ffi.memmove(failure.insn_bytes, b"\x0f\x0b", 2)
        failure.insn_size = 2
        assert exits.loop.serve() == KVM_EXIT_INTERNAL_ERROR
        run.exit_reason = KVM_EXIT_HLT
        assert exits.loop.serve() == KVM_EXIT_HLT
        vcpu.close()
