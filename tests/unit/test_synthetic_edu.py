"""The synthetic guest's edu driver (vmm/synthetic_edu.py) against a stand-in
for QEMU's edu that follows docs/specs/edu.rst: its DMA moves between a bus
address (IOVA = GPA here) and the device's buffer, clears the run bit when
done and raises DMA_IRQ.  What the lab's real edu does in QEMU is checked in
the lab (tests/lab/test_lab_real_host.py); this checks the driver's own
bookkeeping: verification, the counters, a reset with a transfer in flight."""

import types

from tests.support.edu import Edu
from luvmm.vmm import guest
from luvmm.vmm.passthrough import Passthrough
from luvmm.vmm.guest import EduRecord
from luvmm.vmm.guest import edu_in_flight as in_flight
from luvmm.vmm.guest import edu_still_in_flight as still_in_flight
from luvmm.vmm.synthetic_edu import IDLE, SyntheticEduCpu


def vm_with_edu():
    ram = memoryview(bytearray(4 << 20))
    edu = Edu(ram)
    device = Passthrough(None)  # its interrupt wait, over the stand-in (no vector armed)
    device.dev, device.kind = edu, "edu"
    vm = types.SimpleNamespace(view=ram, dev=edu, device=device, mailbox=guest.Mailbox(ram))
    return vm, edu, SyntheticEduCpu(vm)


def steps(cpu, n):
    for _ in range(n):
        cpu.step()


def test_transfers_are_verified_and_counted():
    vm, _, cpu = vm_with_edu()
    steps(cpu, 30)
    mb = vm.mailbox.snapshot()
    assert mb["state"] == 2 and mb["completed"] >= 9
    assert mb["descs_ok"] == 2 * mb["completed"] and mb["verify_failures"] == mb["errors"] == 0
    assert mb["submitted"] - mb["completed"] == mb["inflight"] in (0, 1)
    assert mb["heartbeat"] == 30 and EduRecord(vm.view)["last_completion_ns"] > 0
    cpu.close()


def test_a_transfer_that_comes_back_different_is_a_verify_failure():
    vm, edu, cpu = vm_with_edu()
    steps(cpu, 3)
    edu.corrupt = True
    steps(cpu, 3)
    assert vm.mailbox["verify_failures"] == 1 and vm.mailbox["errors"] == 1
    cpu.close()


def test_a_reset_device_gets_the_transfer_in_flight_again_not_a_corrupted_one():
    vm, edu, cpu = vm_with_edu()
    steps(cpu, 6)
    edu.hold = True
    steps(cpu, 2)  # the next transfer is under way, held by the device
    assert cpu.phase != IDLE
    inflight = in_flight(vm.view)
    (seq,) = inflight.values()
    before = vm.mailbox.snapshot()
    edu.reset()
    edu.hold = False
    assert cpu.device_reset() == 1
    cpu.step()  # the same transfer, started again: not a new submission
    assert in_flight(vm.view) == {0: seq} and vm.mailbox["submitted"] == before["submitted"]
    steps(cpu, 6)
    after = vm.mailbox.snapshot()
    assert EduRecord(vm.view)["redone"] == 1
    assert still_in_flight(vm.view, inflight) == 0
    assert after["verify_failures"] == 0 and after["completed"] > before["completed"]
    cpu.close()


def test_its_registers_go_into_the_machine_state_and_back():
    vm, edu, cpu = vm_with_edu()
    steps(cpu, 5)
    edu.hold = True
    steps(cpu, 2)
    saved = cpu.save()
    again = SyntheticEduCpu(vm)
    again.restore(saved)
    assert (again.phase, again.seq, again.next_seq) == (cpu.phase, cpu.seq, cpu.next_seq) and saved["driver"] == "edu"
    edu.hold = False
    steps(again, 4)
    assert vm.mailbox["verify_failures"] == 0
    cpu.close()
    again.close()


def test_pausing_starts_the_measured_gaps_anew():
    vm, _, cpu = vm_with_edu()
    steps(cpu, 10)
    record = EduRecord(vm.view)
    record["max_heartbeat_gap_ns"] = record["max_completion_gap_ns"] = 123
    cpu.paused()
    assert record["max_heartbeat_gap_ns"] == record["max_completion_gap_ns"] == 0
    steps(cpu, 3)
    assert record["max_heartbeat_gap_ns"] > 0  # measured again from the next turn on
    cpu.close()
