"""`luvmm update`: live-update the host through the LUO agent and collect the
restored VMMs' reports."""

from __future__ import annotations

import errno
import time

from liveupdate.agent_client import AgentError, wait_for_agent
from liveupdate.state import StateDir


def update_once(state: StateDir, *, timeout: float = 60.0, on_started=None) -> dict:
    """One live update; returns the agent's record of it, with each VMM's
    report.  ``on_started({"update": ID, "vms": [...]})`` is called once the
    agent has prepared every VM and goes on to the kexec (on a real host,
    which this process does not outlive)."""
    client, hello = wait_for_agent(state, timeout)
    try:
        started = client.call({"op": "update", "timeout": timeout})[0]
    finally:
        client.close()
    if on_started is not None:
        on_started(started)
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


#: The phases of a live update, in order, as every report names them (their
#: marks: vmm.report); "preserve" and "pause" come before the blackout.
PHASES = ("preserve", "pause", "save", "freeze", "kexec", "spawn", "start-up", "retrieve", "map",
          "vcpu_restore", "device_reattach", "resume")

CYCLE_KEYS = ("blackout_s", "phases_s", "heartbeat_gap_s", "dma_completed_during_blackout", "dma_max_gap_s",
              "dma_errors", "dma_lost", "dma_corrupted", "guest_progressed", "device_reset", "device_preserved",
              "dma_redone", "measured_by")


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * p // 100)))
    return ordered[int(rank) - 1]


def p99_label(samples: int) -> str:
    """"p99", said honestly: of fewer than 100 samples it is their maximum."""
    return "p99" if samples >= 100 else f"p99 (of {samples})"


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


def outcome(summary: dict) -> tuple[int, str]:
    """(exit status, why) of a run of live updates (luvmm.exitcodes): the
    one verdict `luvmm update`, `luvmm demo` and the benchmarks give."""
    from luvmm import exitcodes

    failed = list(summary.get("failed_updates") or [])
    done = [c for c in summary["cycles"] if "error" not in c]
    failed += [f"{c['vm']}: {c['error']}" for c in summary["cycles"] if "error" in c]
    if failed or not done:
        return exitcodes.FAILED, f"{len(failed)} live update(s) failed" + (f": {failed[0]}" if failed else "")
    total = {k: sum(c.get(k) or 0 for c in done) for k in ("dma_errors", "dma_lost", "dma_corrupted")}
    damage = f"DMA errors/lost/corrupted {total['dma_errors']}/{total['dma_lost']}/{total['dma_corrupted']}"
    stuck = [c for c in done if c.get("guest_progressed") is False]
    if total["dma_corrupted"]:
        return exitcodes.DAMAGED, f"DMA was corrupted by a live update ({damage})"
    reset = [c for c in done if c.get("device_reset")]
    if reset:
        return exitcodes.DEVICE_RESET, (f"the kernel reset the device in {len(reset)} of {len(done)} live update(s): "
                                        f"the VM survived, its DMA stopped ({damage})")
    if total["dma_errors"] or total["dma_lost"]:
        return exitcodes.DAMAGED, f"DMA was damaged by a live update ({damage})"
    if stuck:
        return exitcodes.DAMAGED, f"the guest did not go on after {len(stuck)} of {len(done)} live update(s)"
    return exitcodes.OK, f"{len(done)} live update(s), DMA intact ({damage})"


def cycle_line(n: int, total: int, record: dict) -> str:
    """One line per update for progress output: what a user watching wants to see."""
    parts = []
    for c in summarize([record])["cycles"]:
        if "error" in c:
            parts.append(f"{c['vm']}: {c['error']}")
            continue
        parts.append(f"{c['vm']}: blackout {ms(c['blackout_s'])} ms, {c['dma_completed_during_blackout']} DMA "
                     f"completions while paused, errors/lost/corrupted "
                     f"{c['dma_errors']}/{c['dma_lost']}/{c['dma_corrupted']}"
                     + (", device reset" if c.get("device_reset") else "")
                     + (f" ({c['dma_redone']} transfer(s) redone)" if c.get("dma_redone") else ""))
    return f"update {n}/{total}: " + "; ".join(parts)


def format_cycles(summary: dict) -> str:
    """The update table, for people: it fits 80 columns (a VM name over 12
    characters pushes its row), and so do the wrapped summary lines."""
    row = "{:>5} {:<12} {:>8} {:>8} {:>7} {:>9} {:>11} {:>5}"
    lines = [row.format("cycle", "vm", "blackout", "DMA in", "max DMA", "heartbeat", "DMA errors/", "guest"),
             row.format("", "", "ms", "blackout", "gap ms", "gap ms", "lost/corrupt", "on")]
    for c in summary["cycles"]:
        if "error" in c:
            lines.append(f"{c['cycle']:>5} {c['vm']:<12} {c['error']}")
            continue
        lines.append(row.format(c["cycle"], c["vm"], ms(c["blackout_s"]), str(c["dma_completed_during_blackout"]),
                                ms(c["dma_max_gap_s"]), ms(c["heartbeat_gap_s"]),
                                f"{c['dma_errors']}/{c['dma_lost']}/{c['dma_corrupted']}",
                                {True: "yes", False: "NO"}.get(c["guest_progressed"], "-")))
    b = summary["blackout_s"]
    n = sum(1 for c in summary["cycles"] if c.get("blackout_s") is not None)
    lines.append(f"blackout p50 {b['p50'] * 1000:.1f} ms, {p99_label(n)} {b['p99'] * 1000:.1f} ms, "
                 f"max {b['max'] * 1000:.1f} ms")
    lines.append(f"({summary['guest']} guest, {(summary['memory_bytes'] or 0) >> 20} MiB RAM, "
                 f"kernel profile {summary['kernel_profile']})")
    phases = phase_values(summary)
    if phases:
        import textwrap

        text = "phases (p50 ms): " + ", ".join(f"{k} {percentile(v, 50) * 1000:.1f}" for k, v in phases.items())
        lines += textwrap.wrap(text, 80, subsequent_indent="  ")
    return "\n".join(lines)
