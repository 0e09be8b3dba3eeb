"""The outage the guest saw (luvmm.vmm.pace), from heartbeat samples, and the
update report's figures of it where the guest's firmware kept them itself:
its pace ring in guest RAM, on the TSC (luvmm.vmm.report)."""

import struct
import types

import pytest

from luvmm.vmm import guest, machine_state, pace, report
from luvmm.vmm.machine_state import Timestamps

PACE_HZ = 1000.0  # heartbeats per second, before the pause
STOPPED, RESUMED = 10.0, 10.05


def samples(after, *, start=8.0, end=11.0, step=0.001, rate_before=PACE_HZ):
    """A heartbeat sampled every ``step`` s: at ``rate_before`` until the
    pause, still through the blackout, then at ``after(seconds since the
    resume)`` (a rate, per second)."""
    out, h = [], 0.0
    for i in range(int(round((end - start) / step)) + 1):
        t = round(start + i * step, 6)
        out.append((t, int(h)))
        if t < STOPPED:
            h += rate_before * step
        elif t >= RESUMED:
            h += after(t - RESUMED) * step
    return out


def at_pace(_):
    return PACE_HZ


def test_a_guest_at_pace_lost_nothing_and_was_back_at_once():
    out = pace.outage(samples(at_pace), STOPPED, RESUMED)
    assert out["guest_lost_s"] == pytest.approx(0.0, abs=0.002)
    assert out["guest_recovery_s"] == 0.0
    assert out["guest_pace_before_hz"] == pytest.approx(PACE_HZ, rel=0.01)
    assert out["guest_pace_after_hz"] == pytest.approx(PACE_HZ, rel=0.03)


def test_a_guest_standing_still_after_the_resume_lost_that_time():
    """200 ms without a heartbeat after the resume (a vCPU that does not get
    to run): lost 200 ms, back at pace once a 50 ms window holds 40 ms of it."""
    out = pace.outage(samples(lambda s: 0.0 if s < 0.2 else PACE_HZ), STOPPED, RESUMED)
    assert out["guest_lost_s"] == pytest.approx(0.2, abs=0.003)
    assert out["guest_recovery_s"] == pytest.approx(0.19, abs=0.003)


def test_a_crawling_guest_lost_most_of_the_crawl():
    """2% of its pace for 300 ms: about 294 ms lost (luvmm.vmm.pace's example)."""
    out = pace.outage(samples(lambda s: 0.02 * PACE_HZ if s < 0.3 else PACE_HZ), STOPPED, RESUMED)
    assert out["guest_lost_s"] == pytest.approx(0.294, abs=0.003)
    assert out["guest_recovery_s"] == pytest.approx(0.29, abs=0.003)


def test_a_guest_at_half_pace_lost_half_the_horizon_and_never_recovered():
    out = pace.outage(samples(lambda s: PACE_HZ / 2), STOPPED, RESUMED)
    assert out["guest_lost_s"] == pytest.approx(pace.LOST_HORIZON_S / 2, abs=0.003)
    assert out["guest_recovery_s"] is None and out["guest_pace_after_hz"] is None


def test_the_blackout_itself_is_not_counted_and_the_pause_value_holds_it():
    """Samples only before the pause and after the resume (the observer's
    two windows): the heartbeat stands still between them at its value at
    the pause, which a late last sample does not hide."""
    full = samples(at_pace)
    gap = [p for p in full if p[0] <= STOPPED - 0.003 or p[0] >= RESUMED]
    at_pause = next(h for t, h in full if t >= STOPPED)
    out = pace.outage(gap, STOPPED, RESUMED, at_pause=at_pause)
    assert out["guest_lost_s"] == pytest.approx(0.0, abs=0.002) and out["guest_recovery_s"] == 0.0


def test_what_the_samples_cannot_say_is_none():
    empty = dict.fromkeys(("guest_recovery_s", "guest_lost_s", "guest_pace_before_hz", "guest_pace_after_hz"))
    assert pace.outage([], STOPPED, RESUMED) == empty
    # Less than half of the 400 ms before the pause: no pace to compare with.
    assert pace.outage(samples(at_pace, start=STOPPED - 0.1), STOPPED, RESUMED) == empty
    # Samples that end 100 ms after the resume: the pace before, not what was lost over the horizon.
    short = pace.outage(samples(at_pace, end=RESUMED + 0.1), STOPPED, RESUMED)
    assert short["guest_pace_before_hz"] and short["guest_lost_s"] is None
    # A guest that stood still before the pause has no pace to lose.
    assert pace.outage(samples(at_pace, rate_before=0.0), STOPPED, RESUMED) == empty


def test_the_next_pause_ends_the_integral():
    """The next update paused the guest 300 ms after this one's resume:
    what it lost in its own blackout is not this update's."""
    out = pace.outage(samples(lambda s: PACE_HZ if s < 0.3 else 0.0), STOPPED, RESUMED, until=RESUMED + 0.3)
    assert out["guest_lost_s"] == pytest.approx(0.0, abs=0.002)


def test_pace_series_is_the_pace_per_bin_and_none_outside_the_samples():
    s = samples(lambda s: 0.0 if s < 0.2 else PACE_HZ)
    series = pace.pace_series(s, STOPPED - 0.1, RESUMED + 0.4, 0.05)
    assert series[0] == pytest.approx(PACE_HZ, rel=0.05)  # before the pause
    assert series[2] == pytest.approx(0.0, abs=1) and series[5] == pytest.approx(0.0, abs=1)  # paused, then still
    assert series[-1] == pytest.approx(PACE_HZ, rel=0.05)
    assert pace.pace_series(s, 20.0, 20.1, 0.05) == [None, None]


# --- the report, from the pace ring in guest RAM ----------------------------------------------------------------

TSC_HZ = 2.6e9
MULT = guest.tsc_mult(TSC_HZ)


def tsc_of(seconds: float) -> int:
    """The TSC value the firmware converts to ``seconds`` (ns = TSC * tsc_mult >> 32)."""
    return -(-(int(round(seconds * 1e9)) << 32) // MULT)


def ram_with_ring(points, *, mult=MULT) -> bytearray:
    """Guest RAM whose firmware kept ``points`` [(seconds, heartbeat)] in its pace ring (vmm/firmware/mailbox.h)."""
    ram = bytearray(guest.PACE_RING_GPA + 16 * guest.PACE_RING_ENTRIES)
    points = points[-(guest.PACE_RING_ENTRIES - 1):]
    head = len(points) + 5000  # it went round the ring before
    for i, (t, h) in zip(range(head - len(points), head), points):
        struct.pack_into("<QQ", ram, guest.PACE_RING_GPA + 16 * (i % guest.PACE_RING_ENTRIES), int(t * 1e9), h)
    mb = guest.Mailbox(ram)
    mb["pace_head"], mb["tsc_mult"], mb["pace_period_ns"] = head, mult, guest.PACE_PERIOD_NS
    return ram


def restored_vm(ram, *, first_run_tsc: int, guest_kind="firmware"):
    """What update_report reads of a restored VM, on a host with no observer on its bus (a real one)."""
    return types.SimpleNamespace(
        view=memoryview(ram), mailbox=guest.Mailbox(ram), first_run=0.0, crash=None, redone=0, bdf="0000:6a:01.0",
        bus_master_restored=False, completed_while_paused=3,
        config=types.SimpleNamespace(name="a", guest=guest_kind, memory=64 << 20),
        runner=types.SimpleNamespace(first_run_tsc=first_run_tsc),
        device=types.SimpleNamespace(kind="dsa"), guest=types.SimpleNamespace(stamps="tsc"),
        device_enabled=lambda: True, still_in_flight=lambda inflight: 0)


def saved_state(*, tsc=None, heartbeat=0):
    marks = {"prepare": STOPPED - 0.01, "preserved": STOPPED - 0.005, "pause_start": STOPPED - 0.001,
             "stopped": STOPPED, "saved": STOPPED + 0.001}
    mailbox = {"heartbeat": heartbeat, "completed": 10, "errors": 0, "verify_failures": 0}
    return types.SimpleNamespace(timestamps=Timestamps(marks, mailbox, {}, tsc),
                                 device=types.SimpleNamespace(preserved=True))


def ring_report(ram, *, tsc, first_run_tsc, heartbeat_at_pause):
    services = types.SimpleNamespace(machine=None, observer=None)
    after = {"heartbeat": heartbeat_at_pause + 500, "completed": 20, "errors": 0, "verify_failures": 0}
    marks = {"resumed": RESUMED, "verified": RESUMED + 0.01}
    return report.update_report(restored_vm(ram, first_run_tsc=first_run_tsc), services, marks,
                                saved_state(tsc=tsc, heartbeat=heartbeat_at_pause), after)


def ring(after):
    """What the firmware's ring holds: an entry every millisecond while the guest runs, none while it is paused."""
    return [(t, h) for t, h in samples(after, end=RESUMED + 0.6) if not STOPPED < t < RESUMED]


def test_a_real_hosts_report_measures_the_outage_from_the_pace_ring():
    points = ring(lambda s: 0.0 if s < 0.1 else PACE_HZ)
    at_pause = max(h for t, h in points if t <= STOPPED)
    r = ring_report(ram_with_ring(points), tsc={"stopped": tsc_of(STOPPED)}, first_run_tsc=tsc_of(RESUMED),
                    heartbeat_at_pause=at_pause)
    assert r["guest_lost_s"] == pytest.approx(0.1, abs=0.003)
    assert r["guest_recovery_s"] == pytest.approx(0.09, abs=0.003)
    assert r["guest_pace_before_hz"] == pytest.approx(PACE_HZ, rel=0.01)
    for key in report.PACE_FIGURES:
        assert r["measured_by"][key] == report.PACE_RING
    assert r["measured_by"]["dma_completed_during_blackout"] == report.RECORDS  # the rest as before


def test_without_a_ring_or_a_pause_on_the_tsc_the_outage_is_not_measured():
    """The synthetic guest on a real host keeps no ring (tsc_mult 0); a state
    saved by a VMM that did not mark the pause on the TSC has none to go by."""
    points = ring(at_pace)
    for ram, tsc in ((ram_with_ring(points, mult=0), {"stopped": tsc_of(STOPPED)}),
                     (ram_with_ring(points), None)):
        r = ring_report(ram, tsc=tsc, first_run_tsc=tsc_of(RESUMED), heartbeat_at_pause=points[-1][1])
        for key in report.PACE_FIGURES:
            assert r[key] is None and r["measured_by"][key] is None


def test_a_resume_without_a_first_run_mark_goes_on_the_tsc_by_its_realtime_mark():
    """vCPUs that ran before they ever parked leave no first-run TSC: the
    resume's CLOCK_REALTIME mark is put on the TSC clock by a pair read now."""
    import time

    from luvmm.liveupdate import tsc
    from luvmm.vmm.runloop import rdtsc

    hz = tsc.hz(0.05)
    if not hz:
        pytest.skip("no TSC rate to measure here")
    mult = guest.tsc_mult(hz)
    ago = 0.7  # the resume, this long before now on both clocks
    now_s, now_rt = guest.tsc_ns(rdtsc(), mult) / 1e9, time.time()
    shift = now_s - ago - RESUMED  # the ring's clock: the resume at now - ago
    points = [(t + shift, h) for t, h in ring(lambda s: 0.0 if s < 0.1 else PACE_HZ)]
    at_pause = max(h for t, h in points if t <= STOPPED + shift)
    stopped_tsc = -(-(int(round((STOPPED + shift) * 1e9)) << 32) // mult)
    vm = restored_vm(ram_with_ring(points, mult=mult), first_run_tsc=0)
    out = report.ring_outage(vm, saved_state(tsc={"stopped": stopped_tsc}, heartbeat=at_pause), now_rt - ago)
    assert out["guest_lost_s"] == pytest.approx(0.1, abs=0.005)
    assert out["measured_by"]["guest_lost_s"] == report.PACE_RING


def test_the_pause_on_the_tsc_is_an_optional_field_of_the_machine_state():
    """Saved beside the phase marks; a blob without it (an older VMM's)
    restores the same, and what is not a TSC value is left out."""
    from tests.support.machine_state import sample_state

    state = sample_state()
    state.timestamps.tsc = {"stopped": 123456789}
    back = machine_state.decode(machine_state.encode(state))
    assert back.timestamps.tsc == {"stopped": 123456789}
    assert machine_state.decode(machine_state.encode(sample_state())).timestamps.tsc == {}
    assert "tsc" not in sample_state().timestamps.to_dict()  # the layout of a blob without it is unchanged
    assert Timestamps.from_dict({"marks": {}, "tsc": {"stopped": "x", "other": -1}}).tsc == {}
    assert Timestamps.from_dict({"marks": {}, "tsc": [1]}).tsc == {}


# --- what `luvmm update` and the benchmarks print of it ---------------------------------------------------------


def test_the_update_summary_gives_the_guests_outage_beside_the_blackout_in_80_columns():
    from luvmm.liveupdate.update import LOST_HORIZON_MS, format_cycles, summarize

    def record(lost, recovery, source=report.OBSERVER):
        r = {"blackout_s": 0.06, "guest_lost_s": lost, "guest_recovery_s": recovery, "phases_s": {"pause": 0.0002},
             "dma_completed_during_blackout": 12, "dma_max_gap_s": 0.01, "dma_errors": 0, "dma_lost": 0,
             "dma_corrupted": 0, "guest_progressed": True, "guest": "firmware", "memory_bytes": 64 << 20,
             "measured_by": dict.fromkeys(report.PACE_FIGURES, source if lost is not None else None)}
        return {"vms": ["vm-named-12c"], "reports": {"vm-named-12c": r}}

    summary = summarize([record(0.2, 0.15), record(0.3, None), record(None, None), record(0.1, 0.05)])
    assert summary["guest_lost_s"] == {"p50": 0.2, "p99": 0.3, "max": 0.3}
    # Measured and not back at pace within the horizon: counted apart, not a figure made up.
    assert summary["guest_recovery_s"] == {"p50": 0.05, "p99": 0.15, "max": 0.15}
    assert summary["guest_not_recovered"] == 1
    text = format_cycles(summary)
    assert max(len(line) for line in text.splitlines()) <= 80, text
    rows = [line.split() for line in text.splitlines()[2:6]]
    assert [row[3:5] for row in rows] == [["200.0", "150.0"], ["300.0", f">{LOST_HORIZON_MS}"], ["-", "-"],
                                          ["100.0", "50.0"]]
    assert "guest lost p50 200.0 ms, p99 (of 3) 300.0 ms, max 300.0 ms" in text
    assert "1 update(s) not back at pace within 500 ms" in " ".join(text.split())
    assert "measured by the emulated bus observer" in " ".join(text.split())
    assert LOST_HORIZON_MS == pace.LOST_HORIZON_S * 1000  # the tables' horizon is luvmm.vmm.pace's
    # Nothing measured (a real host's synthetic guest): said, not printed as zeros.
    nothing = format_cycles(summarize([record(None, None)]))
    assert "guest lost: not measured" in nothing and "guest recovery: not measured" in nothing
