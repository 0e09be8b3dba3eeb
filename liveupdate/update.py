"""`luvmm update`: live-update the host through the LUO agent and collect the
restored VMMs' reports."""

from __future__ import annotations

import errno
import time

from luvmm.liveupdate.agent_client import AgentError, wait_for_agent
from luvmm.liveupdate.state import StateDir


#: Once an update has started its kexec, how long at least its outcome is
#: waited for (the agent's own deadline for the VMs' reports is longer).
OUTCOME_WAIT_MIN_S = 30.0


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
    # From here the update cannot be taken back (its VMs are paused, the
    # kexec under way): its outcome is waited for at least OUTCOME_WAIT_MIN_S,
    # whatever ``timeout`` allowed each step before it.
    wait = max(timeout, OUTCOME_WAIT_MIN_S)
    deadline = time.monotonic() + wait
    while True:
        # The agent of the new kernel; if it dies before it answers, the one
        # init starts next (the update's record is on disk).
        client, hello = wait_for_agent(state, max(0.0, deadline - time.monotonic()), not_pid=hello["pid"])
        try:
            result = client.call({"op": "result", "timeout": max(0.0, deadline - time.monotonic())})[0]
            break
        except AgentError as e:
            if e.errno != errno.ECONNRESET or time.monotonic() > deadline:
                raise
        finally:
            client.close()
    if not result or result.get("id") != started["update"]:
        raise AgentError(errno.EIO, f"the agent lost update {started['update']}")
    if result.get("phase") in ("kexec", "rolling-back", "restoring"):
        raise AgentError(errno.ETIMEDOUT, f"update {started['update']} is still {result['phase']} after {wait:.0f} s: "
                                          "`luvmm update --last` shows its outcome once it has one")
    if result.get("phase") == "failed":
        raise AgentError(result.get("errno") or 5, result.get("error", "update failed"))
    return result


#: The phases of a live update, in order, as every report names them (their
#: marks: luvmm.vmm.report); "preserve" and "pause" come before the blackout.
PHASES = ("preserve", "pause", "save", "freeze", "kexec", "spawn", "start-up", "retrieve", "map",
          "vcpu_restore", "device_reattach", "resume")

CYCLE_KEYS = ("blackout_s", "guest_lost_s", "guest_recovery_s", "guest_pace_before_hz", "guest_pace_after_hz",
              "phases_s", "heartbeat_gap_s", "dma_completed_during_blackout", "dma_max_gap_s",
              "dma_errors", "dma_lost", "dma_corrupted", "guest_progressed", "device_reset", "device_preserved",
              "dma_redone", "measured_by", "metrics_error")
#: The outage the guest saw (luvmm.vmm.pace), summed up as the blackout is -- over
#: the cycles that measured it: None where none did.
GUEST_OUTAGE = ("guest_lost_s", "guest_recovery_s")
#: luvmm.vmm.pace.LOST_HORIZON_S, as tables say it (this module does not import the VMM's).
LOST_HORIZON_MS = 500


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


def not_recovered(cycle: dict) -> bool:
    """The guest's outage was measured, and its heartbeat was not back at
    pace within the horizon the report waits for (luvmm.vmm.pace)."""
    return cycle.get("guest_lost_s") is not None and cycle.get("guest_recovery_s") is None


def recovery_ms(cycle: dict) -> str:
    """``guest_recovery_s`` for a table: ms, ">500" not back within the horizon, "-" not measured."""
    return f">{LOST_HORIZON_MS}" if not_recovered(cycle) else ms(cycle.get("guest_recovery_s"))


def outage_measured_by(summary: dict) -> str | None:
    """Where the guest's outage figures of a run came from (report's
    ``measured_by``), or None: not measured."""
    sources = []
    for c in summary["cycles"]:
        source = (c.get("measured_by") or {}).get("guest_lost_s")
        if source and source not in sources:
            sources.append(source)
    return " and ".join(sources) or None


def phase_values(summary: dict) -> dict[str, list[float]]:
    """Each phase's times over the cycles, in the order they were first seen."""
    phases: dict[str, list[float]] = {}
    for c in summary["cycles"]:
        for name, v in (c.get("phases_s") or {}).items():
            phases.setdefault(name, []).append(v)
    return phases


def summarize(records: list[dict]) -> dict:
    """The `luvmm update --json` document: one entry per VM per cycle, and
    the percentiles of the blackout and of the outage the guest saw."""
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
    outage = {}
    for key in GUEST_OUTAGE:
        values = [c[key] for c in cycles if c.get(key) is not None]
        outage[key] = percentiles(values) if values else None
    # Measured, and not back at pace within the horizon: left out of guest_recovery_s's percentiles.
    outage["guest_not_recovered"] = sum(1 for c in cycles if not_recovered(c))
    return {
        "cycles": cycles,
        "blackout_s": percentiles(blackouts),
        **outage,
        "guest": first.get("guest"),
        "memory_bytes": first.get("memory_bytes"),
        "kernel_profile": first.get("kernel_profile"),
        "updates": records,
    }


def outcome(summary: dict) -> tuple[int, str]:
    """(exit status, why) of a run of live updates (luvmm.exitcodes): the
    one verdict `luvmm update`, `luvmm demo` and the benchmarks give.

    A VM whose restored VMM could not serve its metrics (``metrics_error``:
    it had to bind the port itself, and someone else had it) fails the run
    (FAILED) -- Prometheus is scraping someone else's figures, or none --
    after what happened to the guest's DMA, which a user must hear of first."""
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
    unserved = [c for c in done if c.get("metrics_error")]
    if unserved:
        return exitcodes.FAILED, (f"{len(unserved)} of {len(done)} live update(s) left a VM without its metrics "
                                  f"endpoint: {unserved[0]['vm']}: {unserved[0]['metrics_error']}")
    return exitcodes.OK, f"{len(done)} live update(s), DMA intact ({damage})"


def cycle_line(n: int, total: int, record: dict) -> str:
    """One line per update for progress output: what a user watching wants to see."""
    parts = []
    for c in summarize([record])["cycles"]:
        if "error" in c:
            parts.append(f"{c['vm']}: {c['error']}")
            continue
        lost = "not measured" if c.get("guest_lost_s") is None else f"{ms(c['guest_lost_s'])} ms"
        parts.append(f"{c['vm']}: blackout {ms(c['blackout_s'])} ms, guest lost {lost}, "
                     f"{c['dma_completed_during_blackout']} DMA "
                     f"completions while paused, errors/lost/corrupted "
                     f"{c['dma_errors']}/{c['dma_lost']}/{c['dma_corrupted']}"
                     + (", device reset" if c.get("device_reset") else "")
                     + (f" ({c['dma_redone']} transfer(s) redone)" if c.get("dma_redone") else "")
                     + (f"; {c['metrics_error']}" if c.get("metrics_error") else ""))
    return f"update {n}/{total}: " + "; ".join(parts)


def format_cycles(summary: dict) -> str:
    """The update table, for people: it fits 80 columns (a VM name over 12
    characters pushes its row), and so do the wrapped summary lines.  Beside
    each blackout, what the guest lost after it and how long it took to be
    back at pace ("-": not measured); the heartbeat's longest gap is in
    ``--json``."""
    import textwrap

    row = "{:>5} {:<12} {:>8} {:>7} {:>8} {:>8} {:>7} {:>12} {:>5}"
    lines = [row.format("cycle", "vm", "blackout", "guest", "guest", "DMA in", "max DMA", "DMA errors/", "guest"),
             row.format("", "", "ms", "lost ms", "recov ms", "blackout", "gap ms", "lost/corrupt", "on")]
    for c in summary["cycles"]:
        if "error" in c:
            lines.append(f"{c['cycle']:>5} {c['vm']:<12} {c['error']}")
            continue
        lines.append(row.format(c["cycle"], c["vm"], ms(c["blackout_s"]), ms(c.get("guest_lost_s")),
                                recovery_ms(c), str(c["dma_completed_during_blackout"]),
                                ms(c["dma_max_gap_s"]), f"{c['dma_errors']}/{c['dma_lost']}/{c['dma_corrupted']}",
                                {True: "yes", False: "NO"}.get(c["guest_progressed"], "-")))
        if c.get("metrics_error"):
            lines.append(f"{'':>5} {c['vm']:<12} {c['metrics_error']}")
    for key, what in (("blackout_s", "blackout"), ("guest_lost_s", "guest lost"),
                      ("guest_recovery_s", "guest recovery")):
        b = summary.get(key)
        n = sum(1 for c in summary["cycles"] if c.get(key) is not None)
        late = summary.get("guest_not_recovered") if key == "guest_recovery_s" else 0
        late_text = f"{late} update(s) not back at pace within {LOST_HORIZON_MS} ms" if late else ""
        if b is None:
            lines.append(f"{what}: {late_text or 'not measured'}")
            continue
        lines += textwrap.wrap(f"{what} p50 {b['p50'] * 1000:.1f} ms, {p99_label(n)} {b['p99'] * 1000:.1f} ms, "
                               f"max {b['max'] * 1000:.1f} ms" + (f"; {late_text}" if late else ""), 80,
                               subsequent_indent="  ")
    source = outage_measured_by(summary)
    lines += textwrap.wrap(f"({summary['guest']} guest, {(summary['memory_bytes'] or 0) >> 20} MiB RAM, "
                           f"kernel profile {summary['kernel_profile']}; the guest's outage "
                           + (f"measured by {source})" if source else
                              "not measured: no observer on the bus, no pace ring in guest RAM)"), 80)
    phases = phase_values(summary)
    if phases:
        text = "phases (p50 ms): " + ", ".join(f"{k} {percentile(v, 50) * 1000:.1f}" for k, v in phases.items())
        lines += textwrap.wrap(text, 80, subsequent_indent="  ")
    return "\n".join(lines)
