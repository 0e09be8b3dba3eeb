"""The firmware's edu driver (vmm/firmware/fw.c, driver = DRIVER_EDU) under
KVM, its MMIO exits forwarded by the VMM's passthrough (luvmm.vmm.passthrough) to
a stand-in for QEMU's edu (tests/support/edu.py): it verifies each transfer
and counts it, a transfer that comes back different is a verify failure, a
device reset with a transfer under way gets that transfer done again (never
a corrupted one), it waits for the device's interrupt through the VMM, and
its stamps -- from the guest's TSC, which the VMM
keeps on the host's -- measure a blackout across a save and a restore on
new vCPUs.  The real edu behind a real IOMMU: the lab
(tests/lab/test_lab_real_host.py)."""

import os
import time

import pytest

from luvmm.host import RealHost
from tests.support.edu import Edu
from luvmm.vmm import guest
from luvmm.vmm.config import VmConfig
from luvmm.vmm.guest import EDU_IDLE, EduRecord
from luvmm.vmm.memory import GuestMemory
from luvmm.vmm.passthrough import Passthrough
from luvmm.vmm.vm import Vm

#: A bound on vCPU exits, not a delay: each step is one KVM_RUN to the next exit.
STEPS = 200_000


@pytest.fixture
def fw(kvm_ok):
    vm = Vm(RealHost(), VmConfig("fw-edu", memory=32 << 20, guest="firmware"))
    vm.memory = GuestMemory.create("fw-edu", vm.config.memory)
    edu = Edu(vm.view)
    vm.device = Passthrough(vm.host)
    vm.device.dev, vm.device.kind = edu, "edu"
    vm.device.eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)]
    edu.msi_fd = vm.device.irq_fd()
    guest.load_firmware(vm.view, slots=1, pairs=1, xfer=4096, driver="edu")
    vm.vcpus = vm.guest.boot(vm)
    vm.device.plan_bars()
    vm.guest.attach_device(vm)
    yield vm, edu
    for vcpu in vm.vcpus:
        vcpu.close()
    os.close(vm.device.eventfds[0])


def run_until(vm, done, what):
    for _ in range(STEPS):
        assert vm.guest.step(vm, vm.vcpus[0]), vm.runner.crash
        if done():
            return
    pytest.fail(f"{what}: not within {STEPS} exits; mailbox {vm.mailbox.snapshot()}")


def test_transfers_are_verified_counted_and_stamped(fw):
    vm, _ = fw
    run_until(vm, lambda: vm.mailbox["completed"] >= 5, "five transfers")
    mb, record = vm.mailbox.snapshot(), EduRecord(vm.view)
    assert mb["state"] == 2 and mb["init_error"] == 0
    assert mb["descs_ok"] == 2 * mb["completed"] and mb["verify_failures"] == mb["errors"] == 0
    assert mb["submitted"] - mb["completed"] == mb["inflight"] in (0, 1)
    assert vm.mailbox["tsc_mult"] > 0 and record["last_completion_ns"] > 0 and record["last_heartbeat_ns"] > 0
    assert vm.device.mmio_unhandled == 0


def test_a_transfer_that_comes_back_different_is_a_verify_failure(fw):
    vm, edu = fw
    run_until(vm, lambda: vm.mailbox["completed"] >= 2, "two transfers")
    edu.corrupt = True
    before = vm.mailbox["completed"]
    run_until(vm, lambda: vm.mailbox["completed"] > before, "a corrupted transfer")
    assert vm.mailbox["verify_failures"] == vm.mailbox["errors"] == 1 and vm.mailbox["last_error"] == before + 1


def test_a_reset_device_gets_the_transfer_under_way_again_not_a_corrupted_one(fw):
    vm, edu = fw
    run_until(vm, lambda: vm.mailbox["completed"] >= 3, "three transfers")
    edu.hold = True
    record = EduRecord(vm.view)
    run_until(vm, lambda: record["phase"] != EDU_IDLE and edu.pending, "a transfer held by the device")
    # Its driver waits for the interrupt through the VMM (LUVMM_PORT_WAIT_IRQ):
    # the run loop polls the device's eventfd, and takes those of the transfers before.
    run_until(vm, lambda: vm.vcpus[0].loop.interrupts > 0, "the run loop waiting for the device's interrupt")
    inflight, before = vm.in_flight(), vm.mailbox.snapshot()
    edu.reset()  # what the new kernel's vfio-pci did to it: the transfer is gone
    edu.hold = False
    assert vm.guest.device_reset(vm) == 1
    run_until(vm, lambda: vm.mailbox["completed"] > before["completed"], "the transfer done again")
    after = vm.mailbox.snapshot()
    # The same transfer done again, not a new one (the next may be under way already).
    assert record["redone"] == 1 and after["submitted"] - after["inflight"] == before["submitted"]
    assert vm.still_in_flight(inflight) == 0
    assert after["verify_failures"] == after["errors"] == 0


def test_the_stamps_measure_a_blackout_across_a_restore_on_new_vcpus(fw):
    vm, _ = fw
    run_until(vm, lambda: vm.mailbox["completed"] >= 2, "two transfers")
    vm.guest.paused(vm)
    record = EduRecord(vm.view)
    assert record["max_heartbeat_gap_ns"] == record["max_completion_gap_ns"] == 0
    states = vm.guest.save(vm)
    for vcpu in vm.vcpus:
        vcpu.close()
    blackout = 0.3
    time.sleep(blackout)  # the blackout being measured
    vm.vcpus = vm.guest.restore(vm, states)  # a new KVM VM, new vCPUs: their TSC set to the host's
    vm.guest.attach_device(vm)
    before = vm.mailbox["completed"]
    run_until(vm, lambda: vm.mailbox["completed"] > before, "a transfer after the restore")
    gap = record["max_heartbeat_gap_ns"] / 1e9
    assert blackout <= gap < blackout + 2.0, gap
    assert blackout <= record["max_completion_gap_ns"] / 1e9 < blackout + 2.0
    assert vm.mailbox["verify_failures"] == 0
