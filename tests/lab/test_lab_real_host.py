"""In the lab: luvmm on a real LUO kernel (mainline: memfds preserved, not
the device), driven by its own commands -- `luvmm boot`, `luvmm vm start
--host real` with QEMU's edu passed through to a KVM guest (the lab guest's
nested KVM), `luvmm update --host real
--kernel` three times, `luvmm update --last` after each boot -- and the two
rollbacks that must leave the VM as it was.  Guest side:
tests/lab/guest_real_host.py."""

import pytest

pytestmark = pytest.mark.timeout(1800)  # four boots under TCG, each stage minutes of Python at a few dozen times slower

from luvmm.liveupdate.update import PHASES
from tests.lab.guest_real_host import UPDATES, VM


@pytest.fixture(scope="module")
def stages(lab_real_host):
    out = []
    for n in range(1, UPDATES + 2):
        record = lab_real_host.json(f"real-host-{n}.json")
        assert "error" not in record, f"stage {n} failed in the guest:\n{record['error']}\n" \
                                      f"{lab_real_host.result.stdout[-3000:]}"
        out.append(record)
    return out


def reports(lab_real_host, stages):
    """Each update's record and this VM's report in it, as `luvmm update --last --json FILE` wrote them."""
    out = []
    for record in stages[1:]:
        last = record["last"]
        assert last["rc"] == 4, last  # the VM kept, its device reset: mainline preserves memfds only
        summary = lab_real_host.json(f"last-{record['stage']}.json")
        (update,) = summary["updates"]
        out.append((summary, update, update["reports"][VM]))
    return out


def test_three_real_kexecs_four_boots(lab_real_host, stages):
    boots = lab_real_host.result.boots
    assert [b["stage"] for b in boots] == [1, 2, 3, 4]
    assert all(b["devices"] and len(b["devices"]) == 2 for b in boots)
    assert lab_real_host.result.status == 0


def test_the_vm_is_a_kvm_guest_where_the_lab_has_nested_kvm(stages):
    s1 = stages[0]
    assert s1["guest"] == ("firmware" if s1["kvm"][0] else "synthetic"), s1["kvm"]
    assert s1["kvm"][0], f"the lab guest has no usable /dev/kvm: {s1['kvm'][1]}"
    for record in stages[1:]:
        assert record["status"]["config"]["guest"] == s1["guest"]


def test_the_vm_is_restored_after_each_kexec_with_its_counters_going_on(stages):
    before = stages[0]["status_after_refusal"]["mailbox"]
    for record in stages[1:]:
        st = record["status"]
        assert st["boot"] in ("kexec", "restart"), st
        assert not st["crash"]
        mb = st["mailbox"]
        # The guest's own counters, kept in its RAM: they went on from where they were.
        assert mb["completed"] > before["completed"] and mb["heartbeat"] > before["heartbeat"]
        assert mb["submitted"] >= mb["completed"] and mb["verify_failures"] == 0 and mb["errors"] == 0
        before = mb


def test_each_report_the_device_reset_dma_resumed_nothing_corrupted(lab_real_host, stages):
    for summary, update, report in reports(lab_real_host, stages):
        assert update["phase"] == "done"
        assert report.get("error") is None
        assert report["device_preserved"] is False and report["device_reset"] is True  # mainline keeps memfds only
        assert report["dma_corrupted"] == 0 and report["dma_lost"] == 0 and report["dma_errors"] == 0
        assert report["guest_progressed"] is True
        assert report["mailbox_after"]["completed"] > report["mailbox_at_pause"]["completed"]
        assert report["dma_redone"] in (0, 1)
        assert summary["cycles"][0]["vm"] == VM
        # Its exits since the resume: the edu's BAR mapped (no MMIO exit), the
        # interrupt waits served by the run loop, none by the VMM's Python.
        exits = report["exits"]
        assert exits["vmm"].get("KVM_EXIT_MMIO", 0) == 0 and exits["vmm"]["KVM_EXIT_IO"] > 0, exits
        assert exits["to_vmm"] == 0, exits


def test_each_report_has_its_phases_including_the_new_kernels_boot(lab_real_host, stages):
    for _, update, report in reports(lab_real_host, stages):
        phases = report["phases_s"]
        assert list(phases) == [p for p in PHASES if p in phases]
        assert {"pause", "save", "freeze", "kexec", "spawn", "retrieve", "map", "device_reattach", "resume"} <= set(phases)
        assert phases["kexec"] > 0.5  # the new kernel's boot, from the reboot call to its first process
        assert report["blackout_s"] >= phases["kexec"]
        assert report["measured_by"]["heartbeat_gap_s"] and report["heartbeat_gap_s"] > 0
        # The guest's own stamps (its TSC, kept on the host's) agree with the host's marks.
        assert abs(report["heartbeat_gap_s"] - report["blackout_s"]) < 2.0, (report["heartbeat_gap_s"],
                                                                              report["blackout_s"])
        assert report["clock"]  # which clock timed the kexec: the TSC's correction, or the two kernels' own


def test_an_image_that_does_not_exist_leaves_the_vm_running(stages):
    s1 = stages[0]
    missing = s1["missing_image"]
    assert missing["rc"] == 1 and "/nonexistent/bzImage" in missing["stderr"] and "Traceback" not in missing["stderr"]
    assert s1["status_after_missing_image"]["mailbox"]["completed"] > s1["status_started"]["mailbox"]["completed"]
    assert not s1["loaded_after_missing_image"]


def test_a_vmm_that_refuses_prepare_rolls_back_every_vm(stages):
    s1 = stages[0]
    refused = s1["refused"]
    assert refused["rc"] == 1 and "Traceback" not in refused["stderr"], refused
    assert "refused" in refused["stderr"]
    assert not s1["loaded_after_refusal"]  # the kernel loaded for it was unloaded
    after = s1["status_after_refusal"]
    assert after["mailbox"]["completed"] > s1["status_after_missing_image"]["mailbox"]["completed"]
    assert not after["prepared"] and s1["refuser_after_refusal"]["guest_state"] == "running"


def test_the_edus_bar_is_mapped_into_the_guest_and_its_steady_state_needs_no_python(stages):
    """vfio-pci offers mmap of the edu's BAR0: the VMM maps all of it into
    the guest (a KVM memory slot), so its driver's register accesses make no
    exit at all; what still exits -- the wait for the device's interrupt, a
    port write -- is served by the run loop in C, never by the VMM's Python."""
    for record in stages:
        for key in ("status_started", "status_after_missing_image", "status"):
            if key not in record:
                continue
            (bar0,) = record[key]["guest_path"]
            assert bar0["mmap"] and bar0["mapped_bytes"] == bar0["size"] == 1 << 20, bar0
            assert bar0["trapped"] == []
    s1 = stages[0]
    first, later = s1["status_started"]["exits"], s1["status_after_missing_image"]["exits"]
    assert later["vmm"].get("KVM_EXIT_MMIO", 0) == first["vmm"].get("KVM_EXIT_MMIO", 0) == 0
    assert later["vmm"]["KVM_EXIT_IO"] > first["vmm"]["KVM_EXIT_IO"]  # the interrupt waits, in C
    assert later["served"]["irq_waits"] > first["served"]["irq_waits"]
    assert later["to_vmm"] == first["to_vmm"], (first, later)  # not one exit went to Python meanwhile
    if later["kvm"]:
        assert later["kvm"]["mmio_exits"] == 0


def test_the_vms_metrics_port_is_served_after_each_kexec(stages):
    """Issue 24, item 5, on the real kernel: the port is the unit's, bound by
    `luvmm boot`'s init at the cold boot and again before the units start
    after each kexec -- the restored VMM serves it, on the socket init passed."""
    for record in stages:
        assert record["metrics"]["lines"] > 0, record["metrics"]
    for n, record in enumerate(stages[1:], 1):
        assert record["status"]["metrics_error"] is None
        assert record["metrics"]["updates"] == n, record["metrics"]  # the VM's own figures, each update counted
