"""Where the VMM still is in the guest's path: the VM's vCPU exits.

Two views, summed over the vCPUs, since this VMM started them:

* KVM's own statistics (the vCPU binary stats file, by KVM's names):
  ``exits`` -- every VM exit, the ones KVM handles in the kernel too --,
  ``mmio_exits`` and ``io_exits`` (the exits to userspace for MMIO and port
  I/O), ``signal_exits``, ``halt_exits``, ``insn_emulation``...;
* the exits to this VMM, by the ``KVM_EXIT_`` reason KVM_RUN returned
  with, as the run loop in C counts them, and how many of them it handed to
  the VMM's Python (``to_vmm``): in the steady state of a guest driving
  its device that number stands still -- no exit waits for the GIL.

The rates are over the last second (:meth:`ExitStats.sample`, which the
control plane calls every second); ``luvmm vm status`` shows both.
"""

from __future__ import annotations

import time

from luvmm.uapi.kvm import KVM_EXIT_NAMES

#: KVM's statistics that count exits or their handling, and the page faults
#: KVM takes for the guest (a new KVM VM after a live update builds its
#: guest's mappings anew, one fault at a time; the rest -- halt polling,
#: TLB flushes -- say nothing of where the guest's time goes).
KVM_STATS = ("exits", "mmio_exits", "io_exits", "signal_exits", "halt_exits", "irq_exits", "irq_window_exits",
             "request_irq_exits", "insn_emulation", "insn_emulation_fail", "hypercalls", "pf_taken", "pf_fixed",
             "pf_guest", "pf_emulate")


class ExitStats:
    """The exits of one VM's vCPUs, sampled for rates."""

    def __init__(self, vm):
        self.vm = vm
        self.since = time.time()
        self._last: tuple[float, dict] | None = None
        self._rates: dict = {}

    def counts(self) -> dict:
        """``{"kvm": {name: n}, "vmm": {KVM_EXIT_NAME: n}, "to_vmm": n, ...}``
        since the vCPUs were made; {} for a guest without KVM vCPUs."""
        loops = [vcpu.loop for vcpu in self.vm.vcpus if getattr(vcpu, "loop", None) is not None]
        if not loops:
            return {}
        kvm: dict[str, int] = {}
        for vcpu in self.vm.vcpus:
            stats = vcpu.stats()
            for name in KVM_STATS:
                if name in stats:
                    kvm[name] = kvm.get(name, 0) + stats[name]
        vmm: dict[str, int] = {}
        served = {"portal_writes": 0, "movdir64b": 0, "irq_waits": 0, "interrupts": 0, "io_ignored": 0,
                  "serve_s": 0.0}
        longest = 0.0
        to_vmm = 0
        for loop in loops:
            c = loop.counters()
            for reason, n in c["exits"].items():
                name = KVM_EXIT_NAMES.get(reason, str(reason))
                vmm[name] = vmm.get(name, 0) + n
            to_vmm += c["to_vmm"]
            for key in served:
                served[key] += c[key]
            longest = max(longest, c["max_serve_s"])
        served["serve_s"] = round(served["serve_s"], 6)
        served["max_serve_s"] = round(longest, 6)
        return {"kvm": kvm, "vmm": vmm, "to_vmm": to_vmm, "served": served}

    def sample(self) -> None:
        """Take the counts now; the rates are the change since the last sample."""
        now, counts = time.monotonic(), self.counts()
        if self._last is not None and counts:
            then, before = self._last
            dt = now - then
            if dt > 0:
                self._rates = {
                    "kvm": {k: round((v - before["kvm"].get(k, 0)) / dt, 1) for k, v in counts["kvm"].items()},
                    "vmm": {k: round((v - before["vmm"].get(k, 0)) / dt, 1) for k, v in counts["vmm"].items()},
                    "to_vmm": round((counts["to_vmm"] - before["to_vmm"]) / dt, 1),
                    "over_s": round(dt, 3)}
        self._last = (now, counts)

    def status(self) -> dict | None:
        """What `vm status` shows: the counts and the rates (None: no KVM vCPUs)."""
        counts = self.counts()
        if not counts:
            return None
        return dict(counts, since=self.since, per_second=self._rates or None)
