"""KVM on a standard KVM: inside the lab the guest's own /dev/kvm is nested
KVM (SVM emulated by QEMU), not this machine's KVM-PVM.  tests/test_kvm.py
and the firmware guest (five live updates on an emulated host whose VM runs
under that KVM: its heartbeat advances across them) pass there.  They run in
the lab_devices boot, under pytest, recorded as JUnit XML."""

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
    kvm = {k: v for k, v in found.items() if k.startswith("tests.test_kvm.")}
    assert set(kvm) == {"tests.test_kvm.test_long_mode_cpl3_io_mmio_regs_and_kick",
                        "tests.test_kvm.test_kvm_errors_carry_errno"}, out[-3000:]
    assert all(v == "passed" for v in kvm.values()), kvm


def test_firmware_guest_runs_and_its_heartbeat_advances(outcomes):
    found, out = outcomes
    name = "tests.test_vmm_e2e.test_firmware_guest_five_updates"
    assert found.get(name) == "passed", (found.get(name), out[-3000:])
