"""KVM on a standard KVM: inside the lab the guest's own /dev/kvm is nested
KVM (SVM emulated by QEMU), not this machine's KVM-PVM.  tests/unit/test_kvm.py
and tests/unit/test_firmware_edu.py pass there (under pytest, recorded as JUnit XML), and the firmware guest
runs there: an emulated host in the lab guest, a VM whose firmware drives its
DSA under that KVM; its heartbeat and DMA advance, and again after a live
update that restores the saved vCPU state on new vCPUs.  Both run in the
lab_devices boot (guest side: tests/lab/guest_firmware.py)."""

import xml.etree.ElementTree as ET

import pytest


@pytest.fixture(scope="module")
def outcomes(lab_devices):
    try:
        tree = ET.parse(lab_devices.path("kvm.xml"))
    except (OSError, ET.ParseError) as e:
        pytest.fail(f"pytest in the guest wrote no report ({e}):\n{lab_devices.text('kvm.out')[-3000:]}")
    found = {}
    for case in tree.iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag + ": " + (child.get("message") or "")[:500]
        found[f"{case.get('classname')}.{case.get('name')}"] = outcome
    return found, lab_devices.text("kvm.out")


def test_test_kvm_passes_on_standard_kvm(outcomes):
    found, out = outcomes
    kvm = {k: v for k, v in found.items() if k.startswith("tests.unit.test_kvm.")}
    assert set(kvm) == {"tests.unit.test_kvm.test_long_mode_cpl3_io_mmio_regs_and_kick",
                        "tests.unit.test_kvm.test_kvm_errors_carry_errno"}, out[-3000:]
    assert all(v == "passed" for v in kvm.values()), kvm


def test_the_firmwares_edu_driver_passes_on_standard_kvm(outcomes):
    """Where a new vCPU's TSC starts again at zero (KVM-PVM's does not), the
    driver's stamps still measure the blackout: the VMM sets it to the host's."""
    found, out = outcomes
    edu = {k: v for k, v in found.items() if k.startswith("tests.unit.test_firmware_edu.")}
    assert len(edu) == 4, out[-3000:]
    assert all(v == "passed" for v in edu.values()), edu


@pytest.fixture(scope="module")
def firmware(lab_devices):
    data = lab_devices.json("firmware.json")
    assert "exception" not in data, data.get("traceback", "") + lab_devices.text("firmware.out")[-2000:]
    return data


def test_the_firmware_guest_runs_and_its_heartbeat_advances(firmware):
    assert firmware["kvm"] == [True, ""] and firmware["guest"] == "firmware"
    first, second = firmware["mailbox"][:2]
    assert first["init_device"] == 1 and first["init_error"] == 0  # the firmware configured its DSA
    assert firmware["advance_s"] >= 0, "the heartbeat and DMA did not advance within the bound"
    assert second["heartbeat"] > first["heartbeat"] and second["completed"] > first["completed"]
    assert second["errors"] == second["verify_failures"] == 0


def test_the_firmware_guest_goes_on_after_a_live_update(firmware):
    update = firmware["update"]
    assert update["crash"] is None
    at_pause, after, third = update["at_pause"], update["after"], firmware["mailbox"][2]
    assert after["heartbeat"] > at_pause["heartbeat"] and after["completed"] >= at_pause["completed"]
    assert firmware["advance_after_update_s"] >= 0
    assert third["heartbeat"] > after["heartbeat"] and third["completed"] > after["completed"]
    assert third["errors"] == third["verify_failures"] == 0
