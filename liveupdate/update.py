"""`luvmm update`: live-update the host through the LUO agent and collect the
restored VMMs' reports."""

from __future__ import annotations

import errno
import time

from liveupdate.agent_client import AgentError, wait_for_agent
from liveupdate.state import StateDir


def update_once(state: StateDir, *, timeout: float = 60.0) -> dict:
    """One live update; returns the agent's record of it, with each VMM's report."""
    client, hello = wait_for_agent(state, timeout)
    try:
        started = client.call({"op": "update", "timeout": timeout})[0]
    finally:
        client.close()
    deadline = time.monotonic() + timeout
    while True:
        # The agent of the new kernel; if it dies before it answers, the one
        # init starts next (the update's record is on disk).
        client, hello = wait_for_agent(state, timeout, not_pid=hello["pid"])
        try:
            result = client.call({"op": "result", "timeout": timeout})[0]
            break
        except AgentError as e:
            if e.errno != errno.ECONNRESET or time.monotonic() > deadline:
                raise
        finally:
            client.close()
    if not result or result.get("id") != started["update"]:
        raise AgentError(5, f"the agent lost update {started['update']}")
    if result.get("phase") == "failed":
        raise AgentError(result.get("errno") or 5, result.get("error", "update failed"))
    return result


CYCLE_KEYS = ("blackout_s", "phases_s", "heartbeat_gap_s", "dma_completed_during_blackout", "dma_max_gap_s",
              "dma_errors", "dma_lost", "dma_corrupted", "guest_progressed")


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * p // 100)))
    return ordered[int(rank) - 1]


def percentiles(values: list[float]) -> dict:
    """{"p50", "p99", "max"}: how blackouts are reported everywhere."""
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values, default=0.0)}


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def phase_values(summary: dict) -> dict[str, list[float]]:
    """Each phase's times over the cycles, in the order they were first seen."""
    phases: dict[str, list[float]] = {}
    for c in summary["cycles"]:
        for name, v in (c.get("phases_s") or {}).items():
            phases.setdefault(name, []).append(v)
    return phases


def summarize(records: list[dict]) -> dict:
    """The `luvmm update --json` document: one entry per VM per cycle, and the blackout percentiles."""
    cycles = []
    for n, record in enumerate(records, 1):
        for vm in record["vms"]:
            report = record["reports"].get(vm)
            if report is None:
                cycles.append({"cycle": n, "vm": vm, "error": "no report from the restored VMM"})
                continue
            entry = {"cycle": n, "vm": vm}
            entry.update({k: report.get(k) for k in CYCLE_KEYS})
            cycles.append(entry)
    blackouts = [c["blackout_s"] for c in cycles if c.get("blackout_s") is not None]
    first = next((r["reports"][v] for r in records for v in r["vms"] if v in r["reports"]), {})
    return {
        "cycles": cycles,
        "blackout_s": percentiles(blackouts),
        "guest": first.get("guest"),
        "memory_bytes": first.get("memory_bytes"),
        "kernel_profile": first.get("kernel_profile"),
        "updates": records,
    }


def format_cycles(summary: dict) -> str:
    lines = [f"{'cycle':>5} {'vm':<10} {'blackout ms':>11} {'DMA in blackout':>15} {'max DMA gap ms':>14} "
             f"{'heartbeat gap ms':>16} {'err/lost/corrupt':>16}  progressed"]
    for c in summary["cycles"]:
        if "error" in c:
            lines.append(f"{c['cycle']:>5} {c['vm']:<10} {c['error']}")
            continue
        lines.append(f"{c['cycle']:>5} {c['vm']:<10} {ms(c['blackout_s']):>11} "
                     f"{str(c['dma_completed_during_blackout']):>15} {ms(c['dma_max_gap_s']):>14} "
                     f"{ms(c['heartbeat_gap_s']):>16} "
                     f"{str(c['dma_errors']) + '/' + str(c['dma_lost']) + '/' + str(c['dma_corrupted']):>16}  "
                     f"{c['guest_progressed']}")
    b = summary["blackout_s"]
    lines.append(f"blackout p50 {b['p50'] * 1000:.1f} ms, p99 {b['p99'] * 1000:.1f} ms, max {b['max'] * 1000:.1f} ms "
                 f"({summary['guest']} guest, {(summary['memory_bytes'] or 0) >> 20} MiB RAM, "
                 f"kernel profile {summary['kernel_profile']})")
    phases = phase_values(summary)
    if phases:
        lines.append("phases (p50 ms): " + ", ".join(f"{k} {percentile(v, 50) * 1000:.1f}" for k, v in phases.items()))
    return "\n".join(lines)
