"""x86-64 architectural state for guests entered directly in long mode.

luvmm guests start in 64-bit mode at CPL 3 with flat segments and identity
page tables, set up from outside through KVM_SET_SREGS/KVM_SET_REGS: no real
mode boot, no firmware.  A vCPU gets its CPUID first (:func:`setup_cpuid`):
standard KVM checks the sregs against the guest's CPUID (``kvm_is_valid_sregs``:
EFER.LME/LMA need CPUID.80000001H:EDX.LM, EFER.NX needs NX, CR4 bits their
features, CR3 within MAXPHYADDR) and a vCPU without one has none, so
KVM_SET_SREGS of long mode is EINVAL there; KVM-PVM does not check.  CPL 3 matters on KVM-PVM hosts (nested, no hardware
virtualization), where guest ring-3 code runs natively and ring-0 code is
emulated about 1000x slower.  With IOPL 3 in RFLAGS, port I/O at CPL 3 is
allowed and exits to the VMM like it would from ring 0.
"""

from __future__ import annotations

import struct

# CR0
X86_CR0_PE = 1 << 0
X86_CR0_MP = 1 << 1
X86_CR0_ET = 1 << 4
X86_CR0_NE = 1 << 5
X86_CR0_WP = 1 << 16
X86_CR0_AM = 1 << 18
X86_CR0_PG = 1 << 31
# CR4
X86_CR4_PAE = 1 << 5
X86_CR4_OSFXSR = 1 << 9
X86_CR4_OSXMMEXCPT = 1 << 10
# EFER
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NX = 1 << 11
# RFLAGS
X86_EFLAGS_FIXED = 1 << 1
X86_EFLAGS_IF = 1 << 9
X86_EFLAGS_IOPL_3 = 3 << 12
# MSRs (arch/x86/include/asm/msr-index.h)
MSR_IA32_TSC = 0x00000010
# Page table entries
PTE_PRESENT = 1 << 0
PTE_RW = 1 << 1
PTE_USER = 1 << 2
PTE_PCD = 1 << 4
PTE_PS = 1 << 7

PAGE_SIZE = 4096
HUGE_PAGE_SIZE = 2 << 20

# Flat GDT selectors, Linux's layout for user segments (RPL 3).
USER_DS = 0x2B
USER_CS = 0x33


def identity_page_tables(mem, base: int, limit: int, *, user: bool = True,
                         uncached: tuple[tuple[int, int], ...] = ()) -> int:
    """Write 4-level page tables at guest-physical ``base`` identity-mapping
    ``[0, limit)`` with 2 MiB pages; return the CR3 value (``base``).

    ``mem`` is the guest RAM buffer (guest-physical address = offset).  The
    tables take 2 pages plus one page per GiB mapped.  ``uncached`` lists
    (start, end) ranges (MMIO) mapped with PCD.
    """
    gib = (limit + (1 << 30) - 1) >> 30
    if gib > 512:
        raise ValueError("identity mapping above 512 GiB is not supported")
    flags = PTE_PRESENT | PTE_RW | (PTE_USER if user else 0)
    pml4, pdpt, pd = base, base + PAGE_SIZE, base + 2 * PAGE_SIZE
    mem[pml4:pd + gib * PAGE_SIZE] = bytes(pd + gib * PAGE_SIZE - pml4)
    struct.pack_into("<Q", mem, pml4, pdpt | flags)
    for g in range(gib):
        struct.pack_into("<Q", mem, pdpt + 8 * g, (pd + g * PAGE_SIZE) | flags)
        for i in range(512):
            addr = (g << 30) | (i << 21)
            if addr >= limit:
                break
            entry = addr | flags | PTE_PS
            if any(start < addr + HUGE_PAGE_SIZE and addr < end for start, end in uncached):
                entry |= PTE_PCD
            struct.pack_into("<Q", mem, pd + g * PAGE_SIZE + 8 * i, entry)
    return base


def page_table_bytes(limit: int) -> int:
    """Bytes :func:`identity_page_tables` needs for ``[0, limit)``."""
    return (2 + ((limit + (1 << 30) - 1) >> 30)) * PAGE_SIZE


def _segment(seg, selector: int, seg_type: int, dpl: int, long_mode: bool) -> None:
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = seg_type
    seg.present = 1
    seg.dpl = dpl
    seg.db = 0 if long_mode else 1
    seg.s = 1
    seg.l = 1 if long_mode else 0
    seg.g = 1
    seg.avl = 0
    seg.unusable = 0


def setup_long_mode(sregs, cr3: int, *, cpl: int = 3) -> None:
    """Fill a ``struct kvm_sregs`` for 64-bit paging with flat segments at ``cpl``."""
    if cpl not in (0, 3):
        raise ValueError("cpl must be 0 or 3")
    cs_sel, ds_sel = (USER_CS, USER_DS) if cpl == 3 else (0x10, 0x18)
    _segment(sregs.cs, cs_sel, 0xB, cpl, True)  # execute/read, accessed
    for name in ("ds", "es", "fs", "gs", "ss"):
        _segment(getattr(sregs, name), ds_sel, 0x3, cpl, False)  # read/write, accessed
    sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_PG
    sregs.cr3 = cr3
    sregs.cr4 = X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT
    sregs.efer = EFER_LME | EFER_LMA | EFER_SCE


def setup_cpuid(vcpu) -> None:
    """KVM_SET_CPUID2: the CPUID KVM supports, with this vCPU's APIC ID in leaf 1
    (EBX[31:24]) and in the x2APIC topology leaves 0xB and 0x1F (EDX).  Call it
    before the first KVM_SET_SREGS (see the module docstring)."""
    from luvmm.abi import ffi

    cpuid = vcpu.vm.kvm.get_supported_cpuid()
    table = ffi.from_buffer("struct kvm_cpuid2 *", cpuid)
    for i in range(table.nent):
        entry = table.entries[i]
        if entry.function == 1:
            entry.ebx = (entry.ebx & 0x00FFFFFF) | ((vcpu.id & 0xFF) << 24)
        elif entry.function in (0xB, 0x1F):
            entry.edx = vcpu.id
    ffi.release(table)
    vcpu.set_cpuid2(cpuid)


def user_rflags() -> int:
    """RFLAGS for a CPL-3 guest that may do port I/O."""
    return X86_EFLAGS_FIXED | X86_EFLAGS_IOPL_3
