"""An observer on the emulated machine's bus: it sees what a logic analyser
would, independently of the software being measured.

* DMA: the time at which each device completed each top-level descriptor
  (kept by the device model).
* Heartbeat: a u64 in guest memory, sampled every millisecond through the
  device's IOMMU domain (IOVA = GPA), recording when its value changes.

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

from devices.emu.iommu import DmaFault

SAMPLE_PERIOD = 0.001
MAX_BINS = 1 << 16
#: Watches are sampled every millisecond: bounded, per connection and in all.
MAX_WATCHES_PER_OWNER = 8
MAX_WATCHES = 64


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
        self.watches: dict[tuple[str, int], collections.deque] = {}
        self._last: dict[tuple[str, int], int | None] = {}
        self._owners: dict[tuple[str, int], set] = {}

    def watch(self, bdf: str, iova: int, owner=None) -> None:
        if bdf not in self.machine.devices:
            raise FileNotFoundError(2, f"no device {bdf}")
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
            self.watches[key] = collections.deque(maxlen=1 << 18)
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
            now = time.time()
            if any(not owners for owners in self._owners.values()):
                self._forget_unused()  # a device no longer in use: its ownerless watches go
            for key, changes in self.watches.items():
                dev = self.machine.devices[key[0]]
                domain = dev.domain
                if domain is None:
                    continue
                try:
                    value = struct.unpack("<Q", domain.read(key[1], 8))[0]
                except DmaFault:
                    continue
                if value != self._last[key]:
                    self._last[key] = value
                    changes.append(now)
            await trio.sleep(SAMPLE_PERIOD)

    def timeline(self, bdf: str, t0: float, t1: float, bin_s: float, iova: int | None = None) -> dict:
        """DMA over [t0, t1) in bins of ``bin_s``: bytes moved and descriptors
        completed per bin, and the heartbeat's changes per bin where watched
        (what `luvmm demo` plots)."""
        dev = self.machine.devices.get(bdf)
        if dev is None:
            raise FileNotFoundError(2, f"no device {bdf}")
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
            changes = list(self.watches[(bdf, iova)])
            for t in changes[bisect.bisect_left(changes, t0):bisect.bisect_left(changes, t1)]:
                beats[int((t - t0) // bin_s)] += 1
            result["heartbeat_changes"] = beats
        return result

    def observe(self, bdf: str, t0: float, t1: float, iova: int | None = None) -> dict:
        dev = self.machine.devices.get(bdf)
        if dev is None:
            raise FileNotFoundError(2, f"no device {bdf}")
        completions, dma_gap = window_stats(dev.completion_times, t0, t1)
        result = {"completions": completions, "max_completion_gap_s": dma_gap}
        if iova is not None and (bdf, iova) in self.watches:
            changes, beat_gap = window_stats(self.watches[(bdf, iova)], t0, t1)
            result.update(heartbeat_changes=changes, heartbeat_max_gap_s=beat_gap)
        return result
