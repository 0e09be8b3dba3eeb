"""MOVDIR64B from a guest, which KVM's instruction emulator cannot handle.

A guest that submits DSA descriptors with MOVDIR64B (as Linux's idxd driver
does) makes KVM exit with KVM_INTERNAL_ERROR_EMULATION when the destination
is MMIO; with KVM_CAP_EXIT_ON_EMULATION_FAILURE the exit carries the
instruction bytes.  The VMM decodes them here -- ``66 [REX] 0F 38 F8 /r``:
MOVDIR64B r64, m512: the destination address is in the ModRM.reg register,
the 64-byte source is the memory operand -- reads the source through the
guest's page tables, writes it to the portal, and steps RIP past it.
"""

from __future__ import annotations

import struct

REGS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


class NotMovdir64b(ValueError):
    pass


def decode(insn: bytes, regs, next_rip: int | None = None) -> tuple[int, int, int]:
    """(destination address, source address, instruction length) of a
    MOVDIR64B, given the register values (an object with rax..r15, rip)."""
    pos = 0
    prefixes = set()
    while pos < len(insn) and insn[pos] in (0x66, 0x67, 0xF2, 0xF3, 0x2E, 0x3E, 0x26, 0x36, 0x64, 0x65):
        prefixes.add(insn[pos])
        pos += 1
    rex = 0
    if pos < len(insn) and 0x40 <= insn[pos] <= 0x4F:
        rex = insn[pos]
        pos += 1
    if 0x66 not in prefixes or insn[pos:pos + 3] != b"\x0f\x38\xf8":
        raise NotMovdir64b(f"not MOVDIR64B: {insn[:8].hex()}")
    pos += 3
    if pos >= len(insn):
        raise NotMovdir64b("truncated instruction")
    modrm = insn[pos]
    pos += 1
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    if mod == 3:
        raise NotMovdir64b("MOVDIR64B needs a memory source")
    reg |= (rex & 4) << 1
    dest = getattr(regs, REGS[reg])
    base_value = 0
    if rm == 4:  # SIB
        sib = insn[pos]
        pos += 1
        scale, index, base = 1 << (sib >> 6), ((sib >> 3) & 7) | (rex & 2) << 2, (sib & 7) | (rex & 1) << 3
        index_value = 0 if index == 4 else getattr(regs, REGS[index]) * scale
        if (base & 7) == 5 and mod == 0:
            base_value, disp_size = 0, 4
        else:
            base_value, disp_size = getattr(regs, REGS[base]), {0: 0, 1: 1, 2: 4}[mod]
        base_value += index_value
    elif rm == 5 and mod == 0:  # RIP-relative
        disp_size = 4
        base_value = None
    else:
        base_value, disp_size = getattr(regs, REGS[rm | (rex & 1) << 3]), {0: 0, 1: 1, 2: 4}[mod]
    disp = 0
    if disp_size == 1:
        disp = struct.unpack_from("<b", insn, pos)[0]
    elif disp_size == 4:
        disp = struct.unpack_from("<i", insn, pos)[0]
    pos += disp_size
    if base_value is None:  # RIP-relative: relative to the next instruction
        base_value = regs.rip + pos
    src = (base_value + disp) & (1 << 64) - 1
    if 0x67 in prefixes:
        src &= 0xFFFFFFFF
        dest &= 0xFFFFFFFF
    return dest, src, pos


def translate(ram, cr3: int, gva: int) -> int:
    """Walk the guest's 4-level page tables (4 KiB, 2 MiB and 1 GiB pages)."""
    table = cr3 & 0x000FFFFFFFFFF000
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = struct.unpack_from("<Q", ram, table + ((gva >> shift) & 0x1FF) * 8)[0]
        if not entry & 1:
            raise NotMovdir64b(f"source {gva:#x} is not mapped")
        if shift in (30, 21) and entry & 0x80:  # a large page
            return (entry & 0x000FFFFFFFFFF000 & ~((1 << shift) - 1)) | (gva & ((1 << shift) - 1))
        table = entry & 0x000FFFFFFFFFF000
    return table | (gva & 0xFFF)
