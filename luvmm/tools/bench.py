"""`luvmm bench blackout|scale|soak`: live updates on a fresh emulated host.

Each run starts its own host (state dir under /tmp), starts the VMs, runs the
updates through the agent, and stops the host: the figures come from the
same path `luvmm update` takes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time

from luvmm.liveupdate.emu import hostctl
from luvmm.liveupdate.state import StateDir, parse_cpu_list
from luvmm.liveupdate.agent_client import AgentError
from luvmm.liveupdate.update import cycle_line, percentile, percentiles, summarize, update_once
from luvmm.liveupdate.emu.client import connect
from luvmm.liveupdate.emu.services import EmulatedUnits
from luvmm.vmm import manage, pace
from luvmm.vmm.config import VmConfig


def guest_cpus_for(spec: str | None, vcpus: int) -> str | None:
    """The CPU list a run sets apart for its guests' vCPUs: ``spec`` as
    given, none for "none", and for "auto" the highest-numbered CPUs, one per
    vCPU, leaving at least one to everything else (none on a 1-CPU machine).
    On a machine of few CPUs the emulated host itself -- the DSA engines and
    the kernel, in Python -- and luvmm's processes starting after a kexec
    would otherwise run on the guest's CPU: what the guest loses to that is
    a machine too small for the measurement, not what luvmm does to it."""
    if spec in (None, "", "none"):
        return None
    if spec != "auto":
        return spec
    allowed = sorted(os.sched_getaffinity(0))
    take = min(vcpus, len(allowed) - 1)
    return ",".join(map(str, allowed[-take:])) if take > 0 else None


@contextlib.contextmanager
def off_the_guest_cpus(guest_cpus: str | None):
    """This process -- a benchmark's clients, its waits for the updates it
    asks for -- off the CPUs set apart for the guests, while in the block,
    as the rest of a host that sets CPUs apart is: a wake-up there preempts
    a vCPU.  (After the host started: it picks its own CPUs.)"""
    affinity = os.sched_getaffinity(0)
    if guest_cpus:
        os.sched_setaffinity(0, (affinity - parse_cpu_list(guest_cpus)) or affinity)
    try:
        yield
    finally:
        os.sched_setaffinity(0, affinity)


@contextlib.contextmanager
def bench_host(*, memory: int, vms: int = 1, guest: str = "firmware", profile: str = "continuous-dma",
               dsa_bandwidth: int = 64 << 20, overcommit: bool = False, metrics: str | None = None,
               guest_cpus: str | None = None):
    """A fresh emulated host running ``vms`` VMs (bench0, bench1, ...); yields
    its state dir.  ``metrics``: where bench0 serves its Prometheus metrics;
    ``guest_cpus``: the CPUs set apart for the vCPUs (guest_cpus_for)."""
    state = StateDir(tempfile.mkdtemp(prefix="luvmm-bench-"))
    try:
        hostctl.start(state, devices=vms, profile=profile, dsa_bandwidth=dsa_bandwidth, guest_cpus=guest_cpus)
        with off_the_guest_cpus(guest_cpus):
            host = connect(state.socket)
            try:
                for i in range(vms):
                    manage.start(state, VmConfig(f"bench{i}", memory=memory, guest=guest,
                                                 metrics=metrics if i == 0 else None),
                                 EmulatedUnits(host), overcommit=overcommit)
            finally:
                host.close_connection()
            yield state
    finally:
        hostctl.stop(state)
        shutil.rmtree(state.path, ignore_errors=True)


#: Before each update the guest runs this long: the window its pace before the
#: pause is taken over (luvmm.vmm.pace.BEFORE_S), and a little more, so that an
#: update's guest_lost_s is not measured against the crawl after the last one.
SETTLE_S = pace.BEFORE_S + 0.1


def run_blackout(*, memory: int, cycles: int, vms: int = 1, guest: str = "firmware",
                 profile: str = "continuous-dma", dsa_bandwidth: int = 64 << 20, overcommit: bool = False,
                 guest_cpus: str | None = None, interval: float = 0.0, progress=None) -> dict:
    """``cycles`` live updates, each started ``interval`` after the last (and
    at least ``SETTLE_S`` after the last one ended); ``progress(line)``, if
    given, after each."""
    with bench_host(memory=memory, vms=vms, guest=guest, profile=profile, dsa_bandwidth=dsa_bandwidth,
                    overcommit=overcommit, guest_cpus=guest_cpus) as state:
        records = []
        started = time.monotonic()
        for n in range(1, cycles + 1):
            # Pacing: the guest at its pace before each pause, for guest_lost_s.
            time.sleep(max(SETTLE_S, started + interval - time.monotonic()) if n > 1 else SETTLE_S)
            started = time.monotonic()
            records.append(update_once(state, timeout=120))
            if progress:
                progress(cycle_line(n, cycles, records[-1]))
        return dict(summarize(records), guest_cpus=guest_cpus)


def _daemon_usage(state: StateDir) -> dict:
    """What the long-lived process (the daemon: the machine and its kernel)
    holds: its fds, its resident memory, and the emulated kernel's open files."""
    pid = state.pid()
    # The fds first (our own status connection below would count while the
    # daemon closes it), and the fewest of a few looks: a leak stays, a
    # connection being closed does not.
    samples = []
    for _ in range(5):
        kinds: dict[str, int] = {}
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue  # closed meanwhile
            kind = target.split(":")[0] if ":" in target else ("memfd" if "memfd" in target else "file")
            kinds[kind] = kinds.get(kind, 0) + 1
        samples.append(kinds)
        time.sleep(0.05)  # spacing the looks
    kinds = min(samples, key=lambda k: sum(k.values()))
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    host = connect(state.socket)
    try:
        status = host.call({"op": "status"})[0]
    finally:
        host.close_connection()
    return {"fds": sum(kinds.values()), "fd_kinds": kinds, "rss_bytes": rss,
            "open_files": len(status["kernel"]["open_files"]), "sessions": len(status["kernel"]["sessions"])}


def run_soak(*, cycles: int, memory: int = 256 << 20, guest: str = "firmware", dsa_bandwidth: int = 64 << 20,
             overcommit: bool = False, progress=None) -> dict:
    """``cycles`` live updates in a row with DMA running.  Leaks are measured
    on the daemon, the one process that lives through them all (the agent
    and the VMMs are new processes after every kexec), from after a first
    warm-up update (caches, the bytecode of the restore path) to the end.
    ``progress(line)``, if given, every 50 updates and at the end."""
    with bench_host(memory=memory, guest=guest, dsa_bandwidth=dsa_bandwidth, overcommit=overcommit) as state:
        update_once(state, timeout=120)
        manage.wait_ready(state, "bench0")
        before = _daemon_usage(state)
        cycles_out, failed = [], []
        for n in range(1, cycles + 1):
            try:
                cycles_out += summarize([update_once(state, timeout=120)])["cycles"]
            except AgentError as e:
                failed.append({"cycle": n, "error": str(e)})
            if progress and (n % 50 == 0 or n == cycles):
                progress(soak_progress(n, cycles_out, failed))
        manage.wait_ready(state, "bench0")
        after = _daemon_usage(state)
    ok = [c for c in cycles_out if "error" not in c]
    blackouts = [c["blackout_s"] for c in ok]
    return {
        "cycles": cycles,
        "completed": len(ok),
        "failed_updates": failed + [c for c in cycles_out if "error" in c],
        "dma_errors": sum(c["dma_errors"] for c in ok),
        "dma_lost": sum(c["dma_lost"] for c in ok),
        "dma_corrupted": sum(c["dma_corrupted"] for c in ok),
        "dma_completed_during_blackout_min": min((c["dma_completed_during_blackout"] for c in ok), default=0),
        "guest_progressed_every_cycle": all(c["guest_progressed"] for c in ok) and bool(ok),
        "fds_leaked": max(0, after["fds"] - before["fds"]) + max(0, after["open_files"] - before["open_files"]),
        "rss_growth_bytes": after["rss_bytes"] - before["rss_bytes"],
        "daemon": {"before": before, "after": after},
        "blackout_s": percentiles(blackouts),
    }


def format_soak(result: dict) -> str:
    b, d = result["blackout_s"], result["daemon"]
    return "\n".join([
        f"{result['completed']}/{result['cycles']} live updates, {len(result['failed_updates'])} failed",
        f"DMA errors {result['dma_errors']}, lost {result['dma_lost']}, corrupted {result['dma_corrupted']}; "
        f"fewest DMA completions in a blackout: {result['dma_completed_during_blackout_min']}",
        f"blackout p50 {b['p50'] * 1e3:.1f} ms, p99 {b['p99'] * 1e3:.1f} ms, max {b['max'] * 1e3:.1f} ms",
        f"daemon: fds {d['before']['fds']} -> {d['after']['fds']}, emulated open files "
        f"{d['before']['open_files']} -> {d['after']['open_files']} (leaked {result['fds_leaked']}), "
        f"RSS {d['before']['rss_bytes'] >> 20} -> {d['after']['rss_bytes'] >> 20} MiB "
        f"({result['rss_growth_bytes'] / (1 << 20):+.1f} MiB)",
    ])


def soak_progress(n: int, cycles: list, failed: list) -> str:
    last = [c["blackout_s"] for c in cycles[-50:] if "blackout_s" in c]
    return f"{n} updates, {len(failed)} failed, last 50 blackouts p50 {percentile(last, 50) * 1e3:.1f} ms"


def run_scale(*, memories: list[int], vm_counts: list[int], cycles: int, guest: str = "firmware",
              dsa_bandwidth: int = 64 << 20, overcommit: bool = False, progress=None) -> dict:
    """Blackout against guest RAM (one VM) and against the number of VMs updated in one kexec."""
    out = {"memory": {}, "vms": {}}
    points = [("memory", str(m), {"memory": m}) for m in memories]
    points += [("vms", str(n), {"memory": min(memories), "vms": n}) for n in vm_counts]
    for i, (axis, key, point) in enumerate(points, 1):
        s = run_blackout(cycles=cycles, guest=guest, dsa_bandwidth=dsa_bandwidth, overcommit=overcommit, **point)
        out[axis][key] = s["blackout_s"]
        if progress:
            b = s["blackout_s"]
            what = f"{int(key) >> 20} MiB" if axis == "memory" else f"{key} VM(s)"
            progress(f"point {i}/{len(points)}, {what}: blackout p50 {b['p50'] * 1e3:.1f} ms, "
                     f"max {b['max'] * 1e3:.1f} ms")
    return out


def format_scale(result: dict) -> str:
    lines = [f"{'guest RAM':>12} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"]
    for memory, b in result["memory"].items():
        lines.append(f"{int(memory) >> 20:>9} MiB {b['p50'] * 1e3:>8.1f} {b['p99'] * 1e3:>8.1f} {b['max'] * 1e3:>8.1f}")
    if result["vms"]:
        lines.append(f"{'VMs':>12} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for count, b in result["vms"].items():
            lines.append(f"{count:>12} {b['p50'] * 1e3:>8.1f} {b['p99'] * 1e3:>8.1f} {b['max'] * 1e3:>8.1f}")
    return "\n".join(lines)
