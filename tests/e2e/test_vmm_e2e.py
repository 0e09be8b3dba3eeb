"""End to end: a host, a VM whose guest drives a passed-through DSA, DMA
running, five live updates; the guest carries on from where it was, with no
DMA error, lost or corrupted, and DMA completing during every blackout under
continuous-dma.  Under reset-on-freeze the report shows DMA stopping."""


import pytest

from luvmm.liveupdate.update import summarize, update_once
from luvmm.vmm import manage
from luvmm.vmm.config import VmConfig
from tests.support.helpers import units

CYCLES = 5


def run_updates(state, host, guest):
    manage.start(state, VmConfig("e2e", memory=64 << 20, guest=guest), units(host))
    records = [update_once(state, timeout=60) for _ in range(CYCLES)]
    return summarize(records), records


def check_continuity(summary, records):
    assert len(summary["cycles"]) == CYCLES
    previous_after = None
    for cycle, record in zip(summary["cycles"], records):
        report = record["reports"]["e2e"]
        at_pause, after = report["mailbox_at_pause"], report["mailbox_after"]
        if previous_after is not None:  # counters carry on from where they were
            assert at_pause["completed"] >= previous_after["completed"]
            assert at_pause["heartbeat"] >= previous_after["heartbeat"]
        assert after["completed"] > at_pause["completed"] and after["heartbeat"] > at_pause["heartbeat"]
        assert cycle["guest_progressed"]
        assert (cycle["dma_errors"], cycle["dma_lost"], cycle["dma_corrupted"]) == (0, 0, 0)
        assert cycle["dma_completed_during_blackout"] > 0
        assert 0 < cycle["blackout_s"] < 10
        previous_after = after
    assert summary["blackout_s"]["max"] >= summary["blackout_s"]["p50"] > 0


@pytest.mark.timeout(600)
def test_firmware_guest_five_updates(kvm_ok, vm_host):
    state, host = vm_host
    summary, records = run_updates(state, host, "firmware")
    assert summary["guest"] == "firmware" and summary["kernel_profile"] == "continuous-dma"
    check_continuity(summary, records)
    assert set(summary["cycles"][0]["phases_s"]) >= {"pause", "freeze", "kexec", "spawn", "start-up", "retrieve",
                                                     "map", "vcpu_restore", "device_reattach", "resume"}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("vm_host", ["reset-on-freeze"], indirect=True)
def test_reset_on_freeze_reports_dma_stopping(kvm_ok, vm_host):
    state, host = vm_host
    manage.start(state, VmConfig("e2e", memory=64 << 20), units(host))
    records = [update_once(state, timeout=60) for _ in range(2)]
    summary = summarize(records)
    for record in records:
        report = record["reports"]["e2e"]
        assert report["device_reset"] and report["crash"] is None  # a finding, not a crash
    # After the first update the device is reset and disabled: the batches the
    # guest had in flight never complete and its DMA counters stop.
    second = summary["cycles"][1]
    assert second["dma_lost"] > 0 and not second["guest_progressed"]
    assert second["dma_completed_during_blackout"] == 0


@pytest.mark.timeout(600)
def test_synthetic_guest_five_updates(vm_host):
    """The same workload driven from the host side (what runs where /dev/kvm is missing)."""
    state, host = vm_host
    summary, records = run_updates(state, host, "synthetic")
    assert summary["guest"] == "synthetic"
    check_continuity(summary, records)


@pytest.mark.timeout(300)
def test_firmware_guest_with_ram_above_4g(kvm_ok, vm_host):
    """16 GiB: RAM continues above the MMIO hole at 4 GiB; the firmware's page
    tables (low 4 GiB) stay clear of its mailbox, and all of the RAM is
    mapped for the device."""
    state, host = vm_host
    st = manage.start(state, VmConfig("big", memory=16 << 30), units(host))
    assert st["guest_state"] == "running" and st["crash"] is None
    record = update_once(state, timeout=60)
    cycle = summarize([record])["cycles"][0]
    assert cycle["guest_progressed"] and (cycle["dma_errors"], cycle["dma_lost"], cycle["dma_corrupted"]) == (0, 0, 0)
    mappings = host.call({"op": "status"})[0]["machine"]["memory"]
    assert any(m["bytes"] == 16 << 30 for m in mappings)


@pytest.mark.timeout(120)
def test_with_dma_running_no_exit_goes_to_the_vmms_python(kvm_ok, vm_host):
    """The guest's path to its device runs through the run loop in C: while
    its DMA runs, its descriptors reach the DSA (a MOVDIR64B that KVM could
    not emulate, or eight stores combined), and not one exit is handed to
    the VMM's Python -- what `vm status` says, from KVM's statistics and the
    run loop's counts."""
    import time

    state, host = vm_host
    manage.start(state, VmConfig("path", memory=64 << 20), units(host))

    def status_after(completed: int) -> dict:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st = manage.status(state, "path")
            if st["mailbox"]["completed"] >= completed:
                return st
            time.sleep(0.05)  # polling the guest's counters
        raise AssertionError(f"the guest's DMA did not reach {completed} batches: {st['mailbox']}")

    first = status_after(10)
    later = status_after(first["mailbox"]["completed"] + 200)
    a, b = first["exits"], later["exits"]
    submitted = later["mailbox"]["submitted"] - first["mailbox"]["submitted"]
    written = b["served"]["portal_writes"] - a["served"]["portal_writes"]
    assert submitted > 0 and abs(written - submitted) <= 2  # (the guest runs on between the two reads)
    assert b["to_vmm"] == a["to_vmm"], (a, b)
    exits = sum(b["vmm"].values()) - sum(a["vmm"].values())
    assert exits >= written  # each descriptor made at least one exit (one snapshot: the run loop's), served in C
    if b["kvm"]:  # KVM's own count agrees: its exits to userspace are the run loop's
        assert b["kvm"]["exits"] - a["kvm"]["exits"] >= exits
    (bar0, portals) = later["guest_path"]
    assert portals["trapped"] == [[0, portals["size"], "portal"]] and not portals["mapped"]
    assert ["vmm"] == [how for _, _, how in bar0["trapped"] if how == "vmm"]  # the MSI-X table, the VMM's
