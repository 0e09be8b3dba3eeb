"""Minimal KVM proof: a guest in 64-bit long mode at CPL 3 exits to the VMM for
port I/O and MMIO, has its registers read and set, and is kicked out of a busy
loop from another thread."""

import errno
import os
import struct
import threading

import pytest

from luvmm.abi import ffi
from luvmm.vmm.kvm import Kvm
from luvmm.uapi.kvm import (
    KVM_CAP_IMMEDIATE_EXIT,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_IN,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_MMIO,
)
from luvmm.vmm.x86 import identity_page_tables, setup_cpuid, setup_long_mode, user_rflags

RAM = 2 << 20
CODE = 0x10000
COUNTER = 0x20000
MMIO = 0x1000_0000  # mapped by the page tables, backed by no memslot

GUEST = bytes.fromhex(
    "b0 42"      # mov al, 0x42
    "e6 10"      # out 0x10, al          -> KVM_EXIT_IO (out)
    "e4 11"      # in al, 0x11           -> KVM_EXIT_IO (in): the VMM supplies the byte
    "89 03"      # mov [rbx], eax        -> KVM_EXIT_MMIO write
    "8b 4b 08"   # mov ecx, [rbx+8]      -> KVM_EXIT_MMIO read: the VMM supplies the value
    "48 01 ca"   # add rdx, rcx
    "e6 12"      # out 0x12, al          -> the VMM reads rdx, sets rsi
    "48 ff 06"   # loop: inc qword [rsi]
    "eb fb"      #       jmp loop
)


@pytest.fixture
def guest(kvm_ok):
    kvm = Kvm()
    vm = kvm.create_vm()
    memfd = os.memfd_create("luvmm-test-ram")
    os.ftruncate(memfd, RAM)
    ram = kvm.host.mmap(memfd, RAM)
    ram_ptr = ffi.from_buffer(ram)
    vm.set_user_memory_region(0, 0, RAM, int(ffi.cast("uintptr_t", ram_ptr)))
    cr3 = identity_page_tables(ram, 0x1000, 1 << 30)
    ram[CODE:CODE + len(GUEST)] = GUEST
    vcpu = vm.create_vcpu(0)
    setup_cpuid(vcpu)
    sregs = vcpu.get_sregs()
    setup_long_mode(sregs, cr3, cpl=3)
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags, regs.rsp = CODE, user_rflags(), 0x80000
    regs.rax, regs.rbx, regs.rdx = 0x11223300, MMIO, 1000
    vcpu.set_regs(regs)
    yield kvm, vcpu, ram
    vcpu.close()
    ffi.release(ram_ptr)
    ram.close()
    os.close(memfd)
    vm.close()
    kvm.close()


def test_long_mode_cpl3_io_mmio_regs_and_kick(guest):
    kvm, vcpu, ram = guest
    assert kvm.check_extension(KVM_CAP_IMMEDIATE_EXIT)
    run = vcpu.kvm_run

    assert vcpu.run() == KVM_EXIT_IO
    assert (run.io.direction, run.io.size, run.io.port, run.io.count) == (KVM_EXIT_IO_OUT, 1, 0x10, 1)
    assert bytes(vcpu.io_data()) == b"\x42"

    assert vcpu.run() == KVM_EXIT_IO
    assert (run.io.direction, run.io.port) == (KVM_EXIT_IO_IN, 0x11)
    vcpu.io_data()[0] = 0x37

    assert vcpu.run() == KVM_EXIT_MMIO
    assert (run.mmio.phys_addr, run.mmio.len, run.mmio.is_write) == (MMIO, 4, 1)
    assert struct.unpack("<I", bytes(run.mmio.data)[:4])[0] == 0x11223337  # 'in' replaced al

    assert vcpu.run() == KVM_EXIT_MMIO
    assert (run.mmio.phys_addr, run.mmio.len, run.mmio.is_write) == (MMIO + 8, 4, 0)
    ffi.memmove(run.mmio.data, struct.pack("<I", 234), 4)

    assert vcpu.run() == KVM_EXIT_IO and run.io.port == 0x12
    regs = vcpu.get_regs()
    assert regs.rdx == 1234  # 1000 + the value the VMM supplied on the MMIO read
    sregs = vcpu.get_sregs()
    assert sregs.cs.dpl == 3 and sregs.cs.l == 1 and sregs.efer & (1 << 10)  # CPL 3, long mode active
    regs.rsi = COUNTER
    vcpu.set_regs(regs)

    # Busy loop: only a kick from another thread gets the vCPU back.
    result = {}

    def vcpu_thread():
        result["exit"] = vcpu.run()

    thread = threading.Thread(target=vcpu_thread)
    thread.start()
    counter = memoryview(ram)[COUNTER:COUNTER + 8].cast("Q")
    while counter[0] < 1000:  # the guest is looping in ring 3
        pass
    vcpu.kick()
    thread.join(timeout=10)
    assert not thread.is_alive(), "the kick did not get the vCPU out of KVM_RUN"
    assert result["exit"] == KVM_EXIT_INTR
    stopped_at = counter[0]
    assert vcpu.get_regs().rsi == COUNTER
    counter.release()
    assert run.immediate_exit == 0  # ready to run again

    # The vCPU resumes where it was, and the kick works before entry too
    # (immediate_exit): KVM_RUN returns at once without running the guest.
    vcpu.kick()
    assert vcpu.run() == KVM_EXIT_INTR
    assert struct.unpack_from("<Q", ram, COUNTER)[0] == stopped_at


def test_kvm_errors_carry_errno(kvm_ok):
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        with pytest.raises(OSError) as e:
            vm.create_vcpu(0)  # the same id twice
        assert e.value.errno == errno.EEXIST
        assert "KVM_CREATE_VCPU" in str(e.value)
        vcpu.close()
