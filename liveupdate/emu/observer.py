"""An observer on the emulated machine's bus: it sees what a logic analyser
would, independently of the software being measured.

* DMA: the time at which each device completed each top-level descriptor
  (kept by the device model).
* Heartbeat: a u64 in guest memory, sampled every millisecond through the
  device's IOMMU domain (IOVA = GPA), recording (time, value) where it
  changes, and the last sample before a change where it stood still: its
  pace (luvmm.vmm.pace) is read from these, a standstill shows flat.

Both live in the machine, so they run straight through a kexec; the VMM and
`luvmm update` ask for a time window afterwards.
"""

from __future__ import annotations

import bisect
import collections
import errno
import struct
import time

import trio

from luvmm.devices.emu.iommu import DmaFault

SAMPLE_PERIOD = 0.001
MAX_BINS = 1 << 16
#: Points kept per watch: at most one per sample, so about four minutes at 1 kHz.
MAX_POINTS = 1 << 18
#: A heartbeat request's window: at 1 kHz, at most this many thousand points.
MAX_HEARTBEAT_WINDOW_S = 30.0
#: Watches are sampled every millisecond: bounded, per connection and in all.
MAX_WATCHES_PER_OWNER = 8
MAX_WATCHES = 64


def change_times(points, t0: float, t1: float) -> list[float]:
    """The times in [t0, t1] where the value of ``points`` ((time, value),
    oldest first) changed; the oldest point kept counts as a change."""
    points = list(points)
    lo, hi = bisect.bisect_left(points, (t0,)), bisect.bisect_right(points, (t1, float("inf")))
    last = points[lo - 1][1] if lo else None
    out = []
    for t, value in points[lo:hi]:
        if value != last:
            out.append(t)
        last = value
    return out


def pace_per_bin(points, t0: float, bin_s: float, nbins: int) -> list[float | None]:
    """The pace (how much the value grows per second) in each of ``nbins`` bins
    from ``t0``: luvmm.vmm.pace's (pace_series), the value taken as moving evenly
    between two points; None where the points do not cover a bin.  Here,
    not imported: the emulated host imports nothing of the VMM (whose
    wiring imports the emulated host)."""
    times = [t for t, _ in points]

    def at(t: float) -> float | None:
        if not times or t < times[0] or t > times[-1]:
            return None
        i = bisect.bisect_right(times, t)
        if i >= len(times):
            return float(points[-1][1])
        (ta, va), (tb, vb) = points[i - 1], points[i]
        return va + (vb - va) * (t - ta) / (tb - ta) if tb > ta else float(vb)

    out = []
    for i in range(nbins):
        a, b = at(t0 + i * bin_s), at(t0 + (i + 1) * bin_s)
        out.append(None if a is None or b is None else (b - a) / bin_s)
    return out


def window_stats(times, t0: float, t1: float) -> tuple[int, float]:
    """(events in [t0, t1], the longest stretch of [t0, t1] without one)."""
    times = list(times)
    lo, hi = bisect.bisect_left(times, t0), bisect.bisect_right(times, t1)
    inside = times[lo:hi]
    points = [t0] + inside + [t1]
    gap = max((b - a for a, b in zip(points, points[1:])), default=t1 - t0)
    return len(inside), gap


class Observer:
    """Watches belong to the connections that asked for them and go with
    them -- except while their device is in use (its DMA domain attached):
    a VM's heartbeat is watched straight through the kexec that kills the
    VMM which asked, and the next VMM's watch takes it over."""

    def __init__(self, machine):
        self.machine = machine
        #: (time, value) of each watched word: where it changed, and where it
        #: last stood before a change (so that a standstill shows flat).
        self.watches: dict[tuple[str, int], collections.deque] = {}
        #: The last sample of each watch, and whether it is in ``watches``.
        self._last: dict[tuple[str, int], tuple[float, int, bool] | None] = {}
        self._owners: dict[tuple[str, int], set] = {}

    def watch(self, bdf: str, iova: int, owner=None) -> None:
        if bdf not in self.machine.devices:
            raise FileNotFoundError(errno.ENOENT, f"no device {bdf}")
        if not isinstance(iova, int) or not 0 <= iova < 1 << 64:
            raise ValueError(f"bad IOVA {iova!r}")
        key = (bdf, iova)
        mine = sum(1 for owners in self._owners.values() if owner in owners)
        if owner not in self._owners.get(key, ()) and mine >= MAX_WATCHES_PER_OWNER:
            raise OSError(errno.ENOSPC, f"at most {MAX_WATCHES_PER_OWNER} watches per connection")
        if key not in self.watches:
            if len(self.watches) >= MAX_WATCHES:
                self._forget_unused()
            if len(self.watches) >= MAX_WATCHES:
                raise OSError(errno.ENOSPC, f"at most {MAX_WATCHES} watches")
            self.watches[key] = collections.deque(maxlen=MAX_POINTS)
            self._last[key] = None
        self._owners.setdefault(key, set()).add(owner)

    def release(self, owner) -> None:
        """The connection ``owner`` closed: its watches go, unless their device is in use."""
        for key, owners in self._owners.items():
            owners.discard(owner)
        self._forget_unused()

    def _forget_unused(self) -> None:
        for key in [k for k, owners in self._owners.items() if not owners]:
            if self.machine.devices[key[0]].domain is None:
                del self.watches[key], self._last[key], self._owners[key]

    async def run(self) -> None:
        while True:
            if any(not owners for owners in self._owners.values()):
                self._forget_unused()  # a device no longer in use: its ownerless watches go
            self.sample(time.time())
            await trio.sleep(SAMPLE_PERIOD)

    def sample(self, now: float) -> None:
        """Read every watched word once (at ``now``).  A value that changed
        is a point; so is the last sample before it where the word stood
        still since the last point -- two points frame a standstill, and
        one a sample is all a moving word costs."""
        for key, points in self.watches.items():
            domain = self.machine.devices[key[0]].domain
            if domain is None:
                continue
            try:
                value = struct.unpack("<Q", domain.read(key[1], 8))[0]
            except DmaFault:
                continue
            last = self._last[key]
            if last is None or value != last[1]:
                if last is not None and not last[2]:
                    points.append((last[0], last[1]))  # where it stood until now
                points.append((now, value))
                self._last[key] = (now, value, True)
            else:
                self._last[key] = (now, value, False)

    def _points(self, bdf: str, iova: int) -> list[tuple[float, int]]:
        """The watch's points, and its last sample where it stands still since the last point."""
        points = list(self.watches[(bdf, iova)])
        last = self._last.get((bdf, iova))
        if last is not None and not last[2]:
            points.append((last[0], last[1]))
        return points

    def timeline(self, bdf: str, t0: float, t1: float, bin_s: float, iova: int | None = None) -> dict:
        """DMA over [t0, t1) in bins of ``bin_s``: bytes moved and descriptors
        completed per bin, and where the heartbeat is watched, its changes
        per bin and its pace per bin (heartbeats/s, None where the samples
        do not cover the bin): what `luvmm demo` plots."""
        dev = self.machine.devices.get(bdf)
        if dev is None:
            raise FileNotFoundError(errno.ENOENT, f"no device {bdf}")
        if not (bin_s > 0 and t1 > t0) or (t1 - t0) / bin_s > MAX_BINS:
            raise ValueError(f"need t1 > t0 and at most {MAX_BINS} bins of a positive width")
        nbins = int(-(-(t1 - t0) // bin_s))
        moved, completions = [0] * nbins, [0] * nbins
        log = list(dev.completion_bytes)
        before = bisect.bisect_left(log, (t0,))
        last = log[before - 1][1] if before else None
        for t, total in log[before:bisect.bisect_left(log, (t1,))]:
            i = int((t - t0) // bin_s)
            completions[i] += 1
            if last is not None:
                moved[i] += total - last
            last = total
        result = {"t0": t0, "bin_s": bin_s, "bytes": moved, "completions": completions}
        if iova is not None and (bdf, iova) in self.watches:
            beats = [0] * nbins
            points = self._points(bdf, iova)
            for t in change_times(points, t0, t1):
                if t < t1:
                    beats[int((t - t0) // bin_s)] += 1
            result["heartbeat_changes"] = beats
            # The pace from the points that frame the window (one either side, where there is one).
            lo = max(bisect.bisect_left(points, (t0,)) - 1, 0)
            hi = bisect.bisect_right(points, (t1, float("inf"))) + 1
            result["heartbeat_pace_hz"] = [None if p is None else round(p, 1)
                                           for p in pace_per_bin(points[lo:hi], t0, bin_s, nbins)]
        return result

    def heartbeat(self, bdf: str, t0: float, t1: float, iova: int) -> list[list]:
        """The watched word's points in [t0, t1], [[time, value]] oldest
        first -- where it changed, and where it stood before a change -- and
        its last sample if the word stands still since: what
        luvmm.vmm.pace measures a guest's outage from.  A window is at most
        ``MAX_HEARTBEAT_WINDOW_S`` long (some tens of thousands of points)."""
        if bdf not in self.machine.devices:
            raise FileNotFoundError(errno.ENOENT, f"no device {bdf}")
        if not t1 >= t0 or t1 - t0 > MAX_HEARTBEAT_WINDOW_S:
            raise ValueError(f"need t1 >= t0, at most {MAX_HEARTBEAT_WINDOW_S:.0f} s apart")
        if (bdf, iova) not in self.watches:
            raise FileNotFoundError(errno.ENOENT, f"no watch of {iova:#x} on {bdf}")
        points = self._points(bdf, iova)
        lo, hi = bisect.bisect_left(points, (t0,)), bisect.bisect_right(points, (t1, float("inf")))
        return [[t, value] for t, value in points[lo:hi]]

    def observe(self, bdf: str, t0: float, t1: float, iova: int | None = None) -> dict:
        dev = self.machine.devices.get(bdf)
        if dev is None:
            raise FileNotFoundError(errno.ENOENT, f"no device {bdf}")
        completions, dma_gap = window_stats(dev.completion_times, t0, t1)
        result = {"completions": completions, "max_completion_gap_s": dma_gap}
        if iova is not None and (bdf, iova) in self.watches:
            changes, beat_gap = window_stats(change_times(self.watches[(bdf, iova)], t0, t1), t0, t1)
            result.update(heartbeat_changes=changes, heartbeat_max_gap_s=beat_gap)
        return result
