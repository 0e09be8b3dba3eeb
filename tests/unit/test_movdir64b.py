"""MOVDIR64B: decoding from KVM's emulation-failure exit, and the VMM turning it into a portal write."""

import os
from types import SimpleNamespace

import pytest

from vmm import guest, movdir64b
from vmm.x86 import identity_page_tables


def regs(**values):
    base = {name: 0 for name in movdir64b.REGS}
    base["rip"] = 0x10000
    base.update(values)
    return SimpleNamespace(**base)


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
])
def test_decode(insn, r, expected):
    assert movdir64b.decode(insn + b"\x90" * 4, regs(**r)) == expected


def test_decode_refuses_other_instructions():
    for insn in (bytes.fromhex("0f38f806"), bytes.fromhex("660f38f9c0"), bytes.fromhex("660f38f8c0")):
        with pytest.raises(movdir64b.NotMovdir64b):
            movdir64b.decode(insn, regs())


def test_page_walk_over_the_guest_tables():
    ram = bytearray(8 << 20)
    cr3 = identity_page_tables(ram, 0x1000, 4 << 30)
    assert movdir64b.translate(ram, cr3, 0x345678) == 0x345678
    with pytest.raises(movdir64b.NotMovdir64b):
        movdir64b.translate(ram, cr3, 1 << 40)


def test_the_vmm_submits_the_64_bytes_and_steps_over_the_instruction():
    from vmm.passthrough import Passthrough

    ram = bytearray(8 << 20)
    cr3 = identity_page_tables(ram, guest.PAGE_TABLES_GPA, 4 << 30)
    desc = os.urandom(64)
    ram[0x300000:0x300040] = desc
    insn = bytes.fromhex("660f38f806")
    state = regs(rax=guest.BAR2_GPA + 0x4000, rsi=0x300000)
    writes = []
    vcpu = SimpleNamespace(get_regs=lambda: state, get_sregs=lambda: SimpleNamespace(cr3=cr3), set_regs=lambda r: None)
    device = Passthrough(host=None)
    device.dev = SimpleNamespace(region_write=lambda index, off, data: writes.append((index, off, data)))
    assert device.movdir64b(vcpu, insn, memoryview(ram))
    assert writes == [(2, 0x4000, desc)] and state.rip == 0x10000 + 5
    assert device.portal_writes == 1


def test_portal_stores_combine_and_a_pause_between_them_loses_nothing():
    from vmm.machine_state import GuestState
    from vmm.passthrough import Passthrough

    writes = []
    dev = SimpleNamespace(region_write=lambda index, off, data: writes.append((off, data)))
    desc = os.urandom(64)
    old = Passthrough(host=None)
    old.dev = dev
    for i in range(5):  # the guest is paused after five of its eight stores
        old.portal_store(0, 0x4000 + 8 * i, desc[8 * i:8 * i + 8])
    assert writes == []
    saved = GuestState({}, portal=old.portal_state()).to_dict()  # into the machine state, and out of it
    new = Passthrough(host=None)  # the restored VMM's
    new.portal, new.dev = GuestState.from_dict(saved).portal_buffers(), dev
    for i in range(5, 8):
        new.portal_store(0, 0x4000 + 8 * i, desc[8 * i:8 * i + 8])
    assert writes == [(0x4000, desc)]
    # A descriptor that starts over a half-written one replaces it, never mixes with it.
    other = os.urandom(64)
    new.portal_store(0, 0x4000, b"x" * 8)
    for i in range(8):
        new.portal_store(0, 0x4000 + 8 * i, other[8 * i:8 * i + 8])
    assert writes[-1] == (0x4000, other)
