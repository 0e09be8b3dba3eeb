"""What one live update did to a VM: the blackout and its phases, and DMA continuity.

Phases (docs/live-update.md, "Phases"), from CLOCK_REALTIME marks taken by the old VMM, the host
and the new VMM:

    preserve         prepare received -> files in the LUO session (the guest
                     still runs: LUO takes a file's contents at the reboot)
    pause            pause requested -> last vCPU stopped        (blackout starts)
    save             -> machine state written
    freeze           -> the host's freeze done (agent hand-off, LUO freeze, KHO image)
    kexec            -> the new kernel up
    spawn            -> the new VMM process running
    start-up         -> connected to the host and the agent, session retrieved
    retrieve         -> files retrieved, machine state read
    map              -> guest RAM mapped
    vcpu_restore     -> KVM and the vCPUs rebuilt
    device_reattach  -> device bound, attached, interrupts re-armed
    resume           -> first vCPU running again                 (blackout ends)

And the outage the guest itself saw after the resume (luvmm.vmm.pace):
``guest_recovery_s`` and ``guest_lost_s``, from its heartbeat's pace --
sampled on the bus by the emulated host's observer, or read from the pace
ring the guest's firmware keeps in its RAM where no observer watches.
The control plane asks for the report once the horizon they are measured
over has passed (luvmm.vmm.control).
"""

from __future__ import annotations

import time

from luvmm.liveupdate.update import PHASES  # noqa: F401 -- the phases this module measures
from luvmm.vmm import guest, pace
from luvmm.vmm.guest import EduRecord
from luvmm.vmm.runloop import rdtsc


def phase_marks(saved_phases: dict, kexec_marks: dict, marks: dict) -> list[tuple[str, float | None]]:
    """The mark that ends each phase, in order (None where it was not seen)."""
    return [
        ("prepare", saved_phases.get("prepare")),
        ("preserve", saved_phases.get("preserved")),
        ("pause", saved_phases.get("stopped")),
        ("save", saved_phases.get("saved")),
        ("freeze", kexec_marks.get("frozen")),
        ("kexec", kexec_marks.get("booted")),
        ("spawn", marks.get("process_start")),
        ("start-up", marks.get("connected")),
        ("retrieve", marks.get("retrieved")),
        ("map", marks.get("mapped")),
        ("vcpu_restore", marks.get("vcpus_restored")),
        ("device_reattach", marks.get("device_reattached")),
        ("resume", marks.get("resumed")),
    ]


def phases_s(seq: list[tuple[str, float | None]]) -> dict[str, float]:
    out = {}
    prev = seq[0][1]
    for name, at in seq[1:]:
        if at is not None and prev is not None:
            out[name] = round(at - prev, 6)
        if at is not None:
            prev = at
    return out


def update_report(vm, services, marks: dict, saved, after: dict) -> dict:
    """The report of the update the VM was just restored from.  What the
    machine says of its kernel and its last kexec, and what an observer on
    its bus saw (DMA completions, the heartbeat), come from ``services``;
    where a host has no such service those figures are None: not measured."""
    saved_phases = saved.timestamps.marks
    at_pause = saved.timestamps.mailbox_at_pause
    inflight = saved.timestamps.inflight_at_pause
    machine = services.machine
    kexec = machine.last_kexec() if machine is not None else {}
    kexec_marks = kexec.get("marks", {})
    # A real host: this kernel's clock is not the old one's; its marks go on the old one's timeline.
    offset = kexec.get("clock_offset_s") or 0.0
    marks = {k: v + offset for k, v in marks.items()}
    stopped, resumed = saved_phases["stopped"], marks["resumed"]
    first_run = (vm.first_run + offset) if vm.first_run else resumed
    report = {
        "name": vm.config.name,
        "guest": vm.config.guest,
        "memory_bytes": vm.config.memory,
        "kernel_profile": machine.kernel_profile() if machine is not None else None,
        "blackout_s": round(first_run - stopped, 6),
        "phases_s": phases_s(phase_marks(saved_phases, kexec_marks, marks)),
        "guest_progressed": after["heartbeat"] > at_pause["heartbeat"] and after["completed"] > at_pause["completed"],
        "dma_errors": after["errors"] - at_pause["errors"],
        "dma_corrupted": after["verify_failures"] - at_pause["verify_failures"],
        "dma_lost": vm.still_in_flight(inflight),
        "dma_in_flight_at_pause": len(inflight),
        "mailbox_at_pause": at_pause,
        "mailbox_after": after,
        "crash": vm.crash and vars(vm.crash),
        "device_reset": not vm.device_enabled(),
        "device_preserved": saved.device.preserved,
        "dma_redone": vm.redone,
        "bus_master_restored": vm.bus_master_restored,
        "clock": kexec.get("clock"),
        "clock_offset_s": kexec.get("clock_offset_s"),
        "marks": dict(marks, **{f"host_{k}": v for k, v in kexec_marks.items()},
                      **{f"old_{k}": v for k, v in saved_phases.items() if isinstance(v, float)}),
    }
    observer = services.observer
    if observer is not None:
        blackout = observer.observe(vm.bdf, stopped, first_run)
        window = observer.observe(vm.bdf, saved_phases["pause_start"], marks["verified"], guest.offset("heartbeat"))
        report.update(dma_completed_during_blackout=blackout["completions"],
                      dma_max_gap_s=round(window["max_completion_gap_s"], 6),
                      heartbeat_gap_s=round(window.get("heartbeat_max_gap_s", 0.0), 6),
                      measured_by={k: OBSERVER for k in OBSERVED})
        outage = observed_outage(vm, observer, stopped, first_run, at_pause.get("heartbeat"))
    else:
        report.update(without_observer(vm, offset))
        outage = ring_outage(vm, saved, marks["resumed"] - offset)
    measured_by = outage.pop("measured_by")
    report.update(outage)
    report["measured_by"].update(measured_by)
    return report


#: The figures an observer on the bus gives (the emulated host's), and what
#: a real host measures them from instead, where its guest keeps the stamps.
OBSERVED = ("dma_completed_during_blackout", "dma_max_gap_s", "heartbeat_gap_s")
OBSERVER = "the emulated bus observer"
RECORDS = "completion records in guest RAM that changed while the VM was paused"
STAMPS = {"realtime": "CLOCK_REALTIME stamps the guest's driver keeps in guest RAM",
          "tsc": "TSC stamps the guest's driver keeps in guest RAM"}


#: The guest's own view of the outage (luvmm.vmm.pace), and where it comes from.
PACE_FIGURES = ("guest_recovery_s", "guest_lost_s", "guest_pace_before_hz", "guest_pace_after_hz")
PACE_RING = "the pace ring the guest's firmware keeps in guest RAM (TSC)"
#: Asked of the observer past the horizon: it samples every millisecond, and a little late.
OBSERVER_LAG_S = 0.05


def _outage(samples, stopped: float, resumed: float, at_pause: int | None, source: str) -> dict:
    """luvmm.vmm.pace.outage's figures, ``measured_by`` ``source`` where the
    samples gave the pace before the pause to measure against (else every
    figure is None, and so is its ``measured_by``: not measured).  Measured,
    a ``guest_recovery_s`` of None says that the guest was not back at pace
    within the horizon the report waited for (luvmm.vmm.pace.LOST_HORIZON_S)."""
    figures = pace.outage(samples, stopped, resumed, at_pause=at_pause) if samples else dict.fromkeys(PACE_FIGURES)
    measured = figures["guest_pace_before_hz"] is not None
    figures["measured_by"] = dict.fromkeys(PACE_FIGURES, source if measured else None)
    return figures


def observed_outage(vm, observer, stopped: float, resumed: float, at_pause: int | None) -> dict:
    """The outage from the heartbeat the observer sampled on the bus: over
    the pace before the pause, and the horizon after the resume (two
    windows, the blackout between them -- it may be long -- left out: the
    heartbeat stands still at ``at_pause`` there)."""
    iova = guest.offset("heartbeat")
    try:
        samples = (observer.heartbeat(vm.bdf, stopped - pace.BEFORE_S - OBSERVER_LAG_S, stopped, iova)
                   + observer.heartbeat(vm.bdf, resumed, resumed + pace.LOST_HORIZON_S + OBSERVER_LAG_S, iova))
    except (OSError, ValueError):  # not watched: not measured
        samples = []
    return _outage(samples, stopped, resumed, at_pause, OBSERVER)


def ring_outage(vm, saved, resumed_at: float) -> dict:
    """The outage from the pace ring the guest's firmware keeps in its RAM,
    on its TSC clock: the pause and the first run go on it through the
    TSC marks of the vCPU runners (the old VMM's, saved; this one's).  A
    vCPU that ran before it ever parked leaves no first-run mark: the
    resume's CLOCK_REALTIME mark (``resumed_at``, this kernel's) goes on
    the TSC clock by a (TSC, CLOCK_REALTIME) pair taken now.  A guest that
    keeps no ring (the synthetic guest; a KVM whose TSC could not be set,
    tsc_mult 0), or a state saved without the pause's mark: None, not
    measured."""
    mult = vm.mailbox["tsc_mult"]
    stopped = saved.timestamps.tsc.get("stopped")
    if not (mult and stopped):
        return _outage([], 0.0, 0.0, None, PACE_RING)
    if vm.runner.first_run_tsc:
        resumed = guest.tsc_ns(vm.runner.first_run_tsc, mult) / 1e9
    else:
        now_tsc, now = rdtsc(), time.time()
        resumed = guest.tsc_ns(now_tsc, mult) / 1e9 - (now - resumed_at)
    samples = [(ns / 1e9, heartbeat) for ns, heartbeat in guest.pace_ring(vm.view)]
    return _outage(samples, guest.tsc_ns(stopped, mult) / 1e9, resumed,
                   saved.timestamps.mailbox_at_pause.get("heartbeat"), PACE_RING)


def without_observer(vm, clock_offset: float = 0.0) -> dict:
    """What a real host measures with no observer on its bus: DMA
    completions during the blackout from the completion records that
    changed while the guest was paused (luvmm.vmm.live_update.restore_into counts
    them before the guest runs); the heartbeat and DMA gaps from the stamps
    an edu driver keeps in its guest's RAM (luvmm.vmm.guest.EduRecord); a DSA
    guest's do not, and those stay None: not measured.  ``measured_by``
    says where each figure came from.  The synthetic guest stamps with the
    host's CLOCK_REALTIME, so its largest gap -- the one across the kexec,
    between a stamp of each kernel -- is corrected by ``clock_offset`` as the
    marks are; the firmware stamps from the TSC, which the kexec does not
    reset (luvmm.vmm.guests.FirmwareGuest keeps the guest's on the host's), and
    needs no correction."""
    out = {"dma_completed_during_blackout": vm.completed_while_paused, "dma_max_gap_s": None,
           "heartbeat_gap_s": None}
    measured = {"dma_completed_during_blackout": RECORDS if vm.completed_while_paused is not None else None}
    stamps = vm.guest.stamps
    if vm.device.kind == "edu" and (stamps != "tsc" or vm.mailbox["tsc_mult"]):
        record = EduRecord(vm.view)
        offset = clock_offset if stamps == "realtime" else 0.0
        out["dma_max_gap_s"] = round(record["max_completion_gap_ns"] / 1e9 + offset, 6)
        out["heartbeat_gap_s"] = round(record["max_heartbeat_gap_ns"] / 1e9 + offset, 6)
        measured.update(dma_max_gap_s=STAMPS[stamps], heartbeat_gap_s=STAMPS[stamps])
    out["measured_by"] = {k: measured.get(k) for k in OBSERVED}
    return out
