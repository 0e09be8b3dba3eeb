"""`luvmm bench blackout|scale`: live-update blackout on a fresh emulated host.

Each run starts its own host (state dir under /tmp), starts the VMs, runs the
updates through the agent, and stops the host: the figures come from the
same path `luvmm update` takes.
"""

from __future__ import annotations

import shutil
import tempfile

from liveupdate import hostctl
from liveupdate.state import StateDir
from liveupdate.update import summarize, update_once
from luvmm.emuhost import connect
from vmm import manage
from vmm.vm import VmConfig


def run_blackout(*, memory: int, cycles: int, vms: int = 1, guest: str = "firmware",
                 profile: str = "continuous-dma", dsa_bandwidth: int = 64 << 20) -> dict:
    state = StateDir(tempfile.mkdtemp(prefix="luvmm-bench-"))
    try:
        hostctl.start(state, devices=vms, profile=profile, dsa_bandwidth=dsa_bandwidth)
        host = connect(state.socket)
        try:
            for i in range(vms):
                manage.start(state, VmConfig(f"bench{i}", memory=memory, guest=guest), host)
        finally:
            host.close_connection()
        return summarize([update_once(state, timeout=120) for _ in range(cycles)])
    finally:
        hostctl.stop(state)
        shutil.rmtree(state.path, ignore_errors=True)


def run_scale(*, memories: list[int], vm_counts: list[int], cycles: int, guest: str = "firmware",
              dsa_bandwidth: int = 64 << 20) -> dict:
    """Blackout against guest RAM (one VM) and against the number of VMs updated in one kexec."""
    out = {"memory": {}, "vms": {}}
    for memory in memories:
        s = run_blackout(memory=memory, cycles=cycles, guest=guest, dsa_bandwidth=dsa_bandwidth)
        out["memory"][str(memory)] = s["blackout_s"]
    for count in vm_counts:
        s = run_blackout(memory=min(memories), cycles=cycles, vms=count, guest=guest, dsa_bandwidth=dsa_bandwidth)
        out["vms"][str(count)] = s["blackout_s"]
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
