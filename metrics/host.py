"""The emulated host daemon's metrics: the devices, the kexecs, the units.

The daemon is the machine: it outlives every VMM and every kexec, so what
it counts -- each DSA's descriptors, bytes, faults and interrupts, and the
kexecs themselves -- is read straight from the machine at each scrape and
only ever goes up.  Device series have the label ``device`` (the BDF).
"""

from __future__ import annotations

from luvmm.metrics.core import Histogram, family
from luvmm.metrics.vmm import BLACKOUT_BUCKETS

KEXEC_BUCKETS = BLACKOUT_BUCKETS

#: name -> (type, help), as a scraper sees them (docs/metrics-and-report.md lists them all).
METRICS = {
    "luvmm_host_dsa_descriptors_completed_total": ("counter", "Descriptors the DSA completed (batch members included)"),
    "luvmm_host_dsa_bytes_completed_total": ("counter", "Bytes the DSA's data operations read or wrote"),
    "luvmm_host_dsa_faults_total": ("counter", "Completions with a page-fault (IOMMU translation) status"),
    "luvmm_host_dsa_errors_total": ("counter", "Completions with an error status"),
    "luvmm_host_dsa_aborted_total": ("counter", "Descriptors aborted by a reset, an FLR or ABORT"),
    "luvmm_host_dsa_interrupts_delivered_total": ("counter", "MSI-X messages the DSA delivered"),
    "luvmm_host_dsa_interrupts_pending": ("gauge", "MSI-X vectors pending (masked or not armed)"),
    "luvmm_host_dsa_queued_descriptors": ("gauge", "Descriptors queued or executing in the DSA"),
    "luvmm_host_dsa_enabled": ("gauge", "1 while the DSA is enabled (GENSTS)"),
    "luvmm_host_dsa_bus_master": ("gauge", "1 while the function's Bus Master Enable is set"),
    "luvmm_host_kexec_total": ("counter", "Kexecs into a new kernel"),
    "luvmm_host_kexec_refused_total": ("counter", "Kexecs refused before the reboot (a freeze failed)"),
    "luvmm_host_kexec_duration_seconds": (
        "histogram", "A kexec: freeze, KHO hand-over, the new kernel up, its units started and its guests running, "
                      "the old units reaped"),
    "luvmm_host_kho_refused_total": ("counter", "KHO images the new kernel refused (corrupt or truncated)"),
    "luvmm_host_kernel_generation": ("gauge", "Kernels booted since the machine powered on"),
    "luvmm_host_luo_sessions": ("gauge", "LUO sessions in the running kernel (label direction)"),
    "luvmm_host_unit_restarts_total": ("counter", "Times init restarted a unit that failed (label unit)"),
}


class HostCollector:
    def __init__(self, daemon):
        self.daemon = daemon

    def collect(self):
        def metric(name, labels=()):
            return family(METRICS, name, labels)

        d = self.daemon
        per_device = {name: metric(name, ["device"]) for name in METRICS if name.startswith("luvmm_host_dsa_")}
        for bdf, dev in d.machine.devices.items():
            s = dev.summary()
            for name, value in (("descriptors_completed_total", s["descriptors"]),
                                ("bytes_completed_total", s["bytes"]), ("faults_total", s["faults"]),
                                ("errors_total", s["errors"]), ("aborted_total", s["aborted"]),
                                ("interrupts_delivered_total", s["interrupts"]),
                                ("interrupts_pending", s["interrupts_pending"]), ("queued_descriptors", s["queued"]),
                                ("enabled", int(s["enabled"])), ("bus_master", int(s["bus_master"]))):
                per_device["luvmm_host_dsa_" + name].add_metric([bdf], value)
        yield from per_device.values()
        for name, value in (("luvmm_host_kexec_total", d.kexec_count),
                            ("luvmm_host_kexec_refused_total", d.kexec_refused),
                            ("luvmm_host_kho_refused_total", d.kho_refused),
                            ("luvmm_host_kernel_generation", d.generation)):
            f = metric(name)
            f.add_metric([], value)
            yield f
        h = Histogram(KEXEC_BUCKETS)
        for seconds in d.kexec_seconds:
            h.observe(seconds)
        f = metric("luvmm_host_kexec_duration_seconds")
        f.add_metric([], h.buckets(), h.total)
        yield f
        sessions = metric("luvmm_host_luo_sessions", ["direction"])
        directions = [s["direction"] for s in d.kernel.luo.status()] if d.kernel is not None else []
        for direction in ("outgoing", "incoming"):
            sessions.add_metric([direction], directions.count(direction))
        yield sessions
        restarts = metric("luvmm_host_unit_restarts_total", ["unit"])
        for unit in d.init.status():
            restarts.add_metric([unit["name"]], unit["restarts"])
        yield restarts
