"""The VMM's metrics: what each live update did to its VM, and the guest's own counters.

A VMM process lives from one kexec to the next, but a Prometheus counter may
only go up and a histogram only accumulate.  So the totals are not kept in
the process: :class:`UpdateStats` lives in ``DIR/vms/NAME/metrics.json``,
loaded when a VMM starts and rewritten after each update (by the control
plane, after the blackout), and the series carry on across the updates they
measure.  The guest's counters need no such care: they live in guest RAM,
which the update preserves.

Every series has the label ``vm``.
"""

from __future__ import annotations

import errno
import json
import os

from luvmm.metrics.core import Histogram, family
from luvmm.liveupdate.update import PHASES

BLACKOUT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
PHASE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
#: The guest's outage (luvmm.vmm.pace): from nothing to its horizon, half a second.
OUTAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
RESULTS = ("success", "rolled_back")

#: name -> (type, help), the names as a scraper sees them (docs/metrics-and-report.md lists them all).
METRICS = {
    "luvmm_blackout_seconds": ("histogram", "Live-update blackout: last vCPU stopped to first vCPU running again"),
    "luvmm_live_update_phase_seconds": ("histogram", "Time of each phase of a live update (label phase)"),
    "luvmm_live_updates_total": ("counter", "Live updates this VM took part in, by result (success, rolled_back)"),
    "luvmm_guest_heartbeat_gap_seconds": (
        "histogram", "Longest gap in the guest heartbeat around a live update, seen on the machine's bus"),
    "luvmm_dma_completions_during_blackout_total": (
        "counter", "DMA descriptors the device completed while the VM was paused, summed over live updates"),
    "luvmm_dma_longest_gap_seconds": (
        "histogram", "Longest stretch without a DMA completion around a live update"),
    "luvmm_dma_errors_total": ("counter", "DMA completions with an error status during live updates"),
    "luvmm_dma_lost_total": ("counter", "DMA batches in flight at the pause that never completed"),
    "luvmm_dma_corrupted_total": ("counter", "DMA copies the device's own verification found wrong after a live update"),
    "luvmm_guest_lost_seconds": (
        "histogram", "Guest time lost after a live update's resume, at its heartbeat's pace before the pause"),
    "luvmm_guest_recovery_seconds": (
        "histogram", "Resume to the guest's heartbeat back at 80% of its pace before the pause, over 50 ms "
                     "(+Inf: not back within the half second measured)"),
    "luvmm_last_blackout_seconds": ("gauge", "Blackout of the last live update"),
    "luvmm_last_guest_lost_seconds": ("gauge", "Guest time lost after the last live update's resume"),
    "luvmm_last_guest_recovery_seconds": (
        "gauge", "Resume to the guest's heartbeat back at pace, in the last live update"),
    "luvmm_last_dma_completions_during_blackout": (
        "gauge", "DMA descriptors completed during the last live update's blackout"),
    "luvmm_vm_memory_bytes": ("gauge", "Guest RAM"),
    "luvmm_guest_heartbeats_total": ("counter", "The guest's heartbeat counter (guest RAM)"),
    "luvmm_guest_batches_submitted_total": ("counter", "DMA batches the guest submitted (guest RAM)"),
    "luvmm_guest_batches_completed_total": ("counter", "DMA batches the guest saw complete and verified (guest RAM)"),
    "luvmm_guest_batches_in_flight": ("gauge", "DMA batches submitted and not yet completed (guest RAM)"),
    "luvmm_guest_dma_errors_total": ("counter", "DMA completions with an error status the guest counted (guest RAM)"),
    "luvmm_guest_verify_failures_total": ("counter", "Copies the guest's on-device verification failed (guest RAM)"),
    "luvmm_guest_recoveries_total": ("counter", "Times the firmware recovered after its VMM died and was restarted"),
}


class UpdateStats:
    """What the live updates did to one VM, accumulated over all of them."""

    VERSION = 1

    def __init__(self):
        self.blackout = Histogram(BLACKOUT_BUCKETS)
        self.phases = {p: Histogram(PHASE_BUCKETS) for p in PHASES}
        self.heartbeat_gap = Histogram(BLACKOUT_BUCKETS)
        self.dma_gap = Histogram(BLACKOUT_BUCKETS)
        self.guest_lost = Histogram(OUTAGE_BUCKETS)
        self.guest_recovery = Histogram(OUTAGE_BUCKETS)
        self.updates = dict.fromkeys(RESULTS, 0)
        self.dma_completed_during_blackout = 0
        self.dma_errors = self.dma_lost = self.dma_corrupted = 0
        self.last_blackout_s: float | None = None
        self.last_dma_completed_during_blackout: int | None = None
        #: The last update's guest outage; None where it was not measured (no series then).
        self.last_guest_lost_s: float | None = None
        self.last_guest_recovery_s: float | None = None

    def record(self, report: dict) -> None:
        """A restored VM's report (luvmm.vmm.report.update_report)."""
        self.updates["success"] += 1
        self.blackout.observe(report["blackout_s"])
        self.last_blackout_s = report["blackout_s"]
        for phase, seconds in report["phases_s"].items():
            self.phases.setdefault(phase, Histogram(PHASE_BUCKETS)).observe(seconds)
        if report.get("heartbeat_gap_s") is not None:
            self.heartbeat_gap.observe(report["heartbeat_gap_s"])
        if report.get("dma_max_gap_s") is not None:
            self.dma_gap.observe(report["dma_max_gap_s"])
        self.last_guest_lost_s = report.get("guest_lost_s")
        self.last_guest_recovery_s = report.get("guest_recovery_s")
        if self.last_guest_lost_s is not None:
            self.guest_lost.observe(self.last_guest_lost_s)
            if self.last_guest_recovery_s is not None:
                self.guest_recovery.observe(self.last_guest_recovery_s)
            else:  # measured, and not back at pace within the horizon (luvmm.vmm.pace): at least that long
                self.guest_recovery.observe_beyond(OUTAGE_BUCKETS[-1])
        if report.get("dma_completed_during_blackout") is not None:
            self.dma_completed_during_blackout += report["dma_completed_during_blackout"]
            self.last_dma_completed_during_blackout = report["dma_completed_during_blackout"]
        self.dma_errors += report["dma_errors"]
        self.dma_lost += report["dma_lost"]
        self.dma_corrupted += report["dma_corrupted"]

    def record_rollback(self) -> None:
        self.updates["rolled_back"] += 1

    def to_dict(self) -> dict:
        return {
            "version": self.VERSION, "blackout": self.blackout.to_dict(),
            "phases": {p: h.to_dict() for p, h in self.phases.items()},
            "heartbeat_gap": self.heartbeat_gap.to_dict(), "dma_gap": self.dma_gap.to_dict(),
            "updates": self.updates, "dma_completed_during_blackout": self.dma_completed_during_blackout,
            "dma_errors": self.dma_errors, "dma_lost": self.dma_lost, "dma_corrupted": self.dma_corrupted,
            "last_blackout_s": self.last_blackout_s,
            "last_dma_completed_during_blackout": self.last_dma_completed_during_blackout,
            "guest_lost": self.guest_lost.to_dict(), "guest_recovery": self.guest_recovery.to_dict(),
            "last_guest_lost_s": self.last_guest_lost_s, "last_guest_recovery_s": self.last_guest_recovery_s,
        }

    @classmethod
    def from_dict(cls, d: dict) -> UpdateStats:
        if d.get("version") != cls.VERSION:
            raise ValueError(f"metrics state version {d.get('version')!r}, expected {cls.VERSION}")
        s = cls()
        s.blackout = Histogram.from_dict(BLACKOUT_BUCKETS, d["blackout"])
        s.phases.update({p: Histogram.from_dict(PHASE_BUCKETS, h) for p, h in d["phases"].items()})
        s.heartbeat_gap = Histogram.from_dict(BLACKOUT_BUCKETS, d["heartbeat_gap"])
        s.dma_gap = Histogram.from_dict(BLACKOUT_BUCKETS, d["dma_gap"])
        s.updates.update({k: int(v) for k, v in d["updates"].items()})
        for key in ("dma_completed_during_blackout", "dma_errors", "dma_lost", "dma_corrupted"):
            setattr(s, key, int(d[key]))
        s.last_blackout_s = d.get("last_blackout_s")
        s.last_dma_completed_during_blackout = d.get("last_dma_completed_during_blackout")
        # Not in the files of a luvmm that did not measure the guest's outage: they start empty.
        s.guest_lost = Histogram.from_dict(OUTAGE_BUCKETS, d.get("guest_lost"))
        s.guest_recovery = Histogram.from_dict(OUTAGE_BUCKETS, d.get("guest_recovery"))
        s.last_guest_lost_s = d.get("last_guest_lost_s")
        s.last_guest_recovery_s = d.get("last_guest_recovery_s")
        return s

    @classmethod
    def load(cls, path: str) -> UpdateStats:
        """The stats at ``path``; fresh ones if there are none.  A damaged
        file raises ValueError: counters silently starting again from zero
        would be a lie to every dashboard."""
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except FileNotFoundError:
            return cls()
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: damaged metrics state: {e}") from None

    def save(self, path: str) -> None:
        """Whole or not at all (a new file renamed over the old), never through a symlink."""
        if os.path.islink(path):
            raise OSError(errno.ELOOP, f"{path} is a symlink: not written through")
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f)
        os.replace(tmp, path)


class VmmCollector:
    """A prometheus-client collector for one VM: its update stats and, at
    every scrape, the guest's mailbox."""

    def __init__(self, vm: str, stats: UpdateStats, mailbox, memory_bytes: int):
        self.vm, self.stats, self.mailbox, self.memory_bytes = vm, stats, mailbox, memory_bytes

    def collect(self):
        def metric(name, labels=()):
            return family(METRICS, name, ["vm", *labels])

        def histogram(name, h: Histogram):
            f = metric(name)
            f.add_metric([self.vm], h.buckets(), h.total)
            return f

        s, vm = self.stats, self.vm
        yield histogram("luvmm_blackout_seconds", s.blackout)
        phases = metric("luvmm_live_update_phase_seconds", ["phase"])
        for phase, h in s.phases.items():
            phases.add_metric([vm, phase], h.buckets(), h.total)
        yield phases
        updates = metric("luvmm_live_updates_total", ["result"])
        for result, n in s.updates.items():
            updates.add_metric([vm, result], n)
        yield updates
        yield histogram("luvmm_guest_heartbeat_gap_seconds", s.heartbeat_gap)
        yield histogram("luvmm_dma_longest_gap_seconds", s.dma_gap)
        yield histogram("luvmm_guest_lost_seconds", s.guest_lost)
        yield histogram("luvmm_guest_recovery_seconds", s.guest_recovery)
        for name, value in (("luvmm_dma_completions_during_blackout_total", s.dma_completed_during_blackout),
                            ("luvmm_dma_errors_total", s.dma_errors), ("luvmm_dma_lost_total", s.dma_lost),
                            ("luvmm_dma_corrupted_total", s.dma_corrupted),
                            ("luvmm_vm_memory_bytes", self.memory_bytes),
                            ("luvmm_last_blackout_seconds", s.last_blackout_s),
                            ("luvmm_last_guest_lost_seconds", s.last_guest_lost_s),
                            ("luvmm_last_guest_recovery_seconds", s.last_guest_recovery_s),
                            ("luvmm_last_dma_completions_during_blackout", s.last_dma_completed_during_blackout)):
            if value is not None:  # no "last" before the first update
                f = metric(name)
                f.add_metric([vm], value)
                yield f
        mb = self.mailbox()
        for name, field in (("luvmm_guest_heartbeats_total", "heartbeat"),
                            ("luvmm_guest_batches_submitted_total", "submitted"),
                            ("luvmm_guest_batches_completed_total", "completed"),
                            ("luvmm_guest_batches_in_flight", "inflight"),
                            ("luvmm_guest_dma_errors_total", "errors"),
                            ("luvmm_guest_verify_failures_total", "verify_failures"),
                            ("luvmm_guest_recoveries_total", "recoveries")):
            f = metric(name)
            f.add_metric([vm], mb[field])
            yield f

