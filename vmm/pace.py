"""The outage the guest lived through, from its heartbeat's pace.

The blackout (last vCPU stopped -> first vCPU running again) is what the
VMM controls; it is not what the guest lives through.  Work the VMM does
after the resume -- an import that holds the GIL while an MMIO exit waits
for it, a busy control plane, a device that is slow to come back -- leaves
the guest running, and crawling.  So luvmm also reads the guest's own
progress, its heartbeat (a counter its driver loop bumps), and says:

* ``guest_recovery_s``: from the resume until the heartbeat's pace, over a
  window of 50 ms, is back to at least 80% of its pace over the 400 ms
  before the pause (0: the first 50 ms after the resume were at pace);
* ``guest_lost_s``: the guest time lost after the resume, in seconds at the
  pre-pause pace -- the integral of the pace deficit over the half second
  after the resume, ``W - (H(resume + W) - H(resume)) / pace_before``,
  never below 0.  A guest that never slowed loses 0; one that crawled at 2%
  for 300 ms loses about 294 ms.

Samples are (time, heartbeat) pairs on one clock with the pause and resume
marks: the emulated host's bus observer samples guest RAM every millisecond
(CLOCK_REALTIME); on a real host the guest's firmware keeps them itself in
its pace ring (the TSC, which a kexec does not reset).  Between samples the
heartbeat is taken as moving evenly; across the blackout it stands still at
its value at the pause.  Lean: pure arithmetic on lists.
"""

from __future__ import annotations

#: The pre-pause pace is measured over this long before the pause.
BEFORE_S = 0.4
#: The pace after the resume is judged over windows this long...
WINDOW_S = 0.05
#: ... against this share of the pre-pause pace.
RECOVERED = 0.8
#: The deficit is integrated over this long after the resume.
LOST_HORIZON_S = 0.5
#: How far apart the windows are tried when looking for the recovery.
STEP_S = 0.001


class Heartbeat:
    """H(t), the heartbeat's count at time t, from samples: linear between
    two samples.  Given a pause and a resume, it stands still between them
    at its value at the pause (``at_pause``, where the VMM read it; else the
    last sample before)."""

    def __init__(self, samples: list[tuple[float, int]], stopped: float | None = None,
                 resumed: float | None = None, at_pause: int | None = None):
        points = sorted(samples)
        if stopped is not None and resumed is not None:
            before = [p for p in points if p[0] <= stopped]
            after = [p for p in points if p[0] >= resumed]
            level = at_pause if at_pause is not None else (before[-1][1] if before else None)
            middle = []
            if level is not None:
                level = max(level, before[-1][1]) if before else level
                level = min(level, after[0][1]) if after else level
                middle = [(stopped, level), (resumed, level)]
            points = before + middle + after
        self.t = [t for t, _ in points]
        self.v = [v for _, v in points]

    def __call__(self, t: float) -> float | None:
        if not self.t or t < self.t[0] or t > self.t[-1]:
            return None
        i = _bisect_right(self.t, t)
        if i >= len(self.t):
            return float(self.v[-1])
        t0, t1, v0, v1 = self.t[i - 1], self.t[i], self.v[i - 1], self.v[i]
        return v0 + (v1 - v0) * (t - t0) / (t1 - t0) if t1 > t0 else float(v1)

    def pace(self, a: float, b: float) -> float | None:
        """Heartbeats per second over [a, b]."""
        ha, hb = self(a), self(b)
        return None if ha is None or hb is None or b <= a else (hb - ha) / (b - a)


def _bisect_right(a: list[float], x: float) -> int:
    """bisect.bisect_right, without loading its extension module (_bisect)
    into the VMM that computes a report while its guest runs (luvmm.vmm.link)."""
    lo, hi = 0, len(a)
    while lo < hi:
        mid = (lo + hi) // 2
        if x < a[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


def outage(samples: list[tuple[float, int]], stopped: float, resumed: float, *, at_pause: int | None = None,
           until: float | None = None) -> dict:
    """``guest_recovery_s``, ``guest_lost_s`` and the paces they come from,
    for one pause at ``stopped`` and resume at ``resumed``.  ``until``: the
    next pause, if it came before the horizon (the integral stops there).
    Figures that the samples cannot give are None: not measured."""
    out = {"guest_recovery_s": None, "guest_lost_s": None, "guest_pace_before_hz": None,
           "guest_pace_after_hz": None}
    h = Heartbeat(samples, stopped, resumed, at_pause)
    before = h.pace(max(stopped - BEFORE_S, h.t[0] if h.t else stopped), stopped)
    if not before or stopped - (h.t[0] if h.t else stopped) < BEFORE_S / 2:
        return out  # no pace to compare with
    out["guest_pace_before_hz"] = round(before, 1)
    end = min(h.t[-1] if h.t else resumed, until if until is not None else float("inf"))
    horizon = min(resumed + LOST_HORIZON_S, end)
    if horizon - resumed >= LOST_HORIZON_S / 2:
        gained = h(horizon) - h(resumed)
        out["guest_lost_s"] = round(max(0.0, (horizon - resumed) - gained / before), 6)
    t = resumed
    while t + WINDOW_S <= end:
        pace = h.pace(t, t + WINDOW_S)
        if pace is not None and pace >= RECOVERED * before:
            out["guest_recovery_s"] = round(t - resumed, 6)
            out["guest_pace_after_hz"] = round(pace, 1)
            break
        t += STEP_S
    return out


def pace_series(samples: list[tuple[float, int]], t0: float, t1: float, bin_s: float) -> list[float | None]:
    """The heartbeat's pace (per second) in each bin of [t0, t1): what the
    demo's report plots around each update."""
    h = Heartbeat(samples)
    out = []
    t = t0
    while t < t1 - 1e-9:
        out.append(h.pace(t, min(t + bin_s, t1)))
        t += bin_s
    return out
