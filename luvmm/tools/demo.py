"""`luvmm demo`: the whole story in one command, on the embedded emulated host.

It starts an emulated host of its own (a fresh state dir, so a host you
already run is left alone), a VM whose guest firmware drives a passed-through
DSA, lets DMA run, live-updates the host N times while a terminal view shows
progress, DMA throughput and each blackout with its phases, and writes a
report (metrics/report.py) whose plots show DMA going on while the VM was
paused.  The DMA and heartbeat timelines come from the observer on the
emulated machine's bus, not from the software being measured.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time

import trio

from luvmm.liveupdate.emu import hostctl
from luvmm.liveupdate.agent_client import AgentError
from luvmm.liveupdate.state import StateDir
from luvmm.liveupdate.update import recovery_ms, summarize, update_once
from luvmm.tools.bench import off_the_guest_cpus
from luvmm.liveupdate.emu.client import connect
from luvmm.liveupdate.emu.services import EmulatedUnits
from luvmm.vmm import guest, manage, pace
from luvmm.liveupdate.update import PHASES
from luvmm.vmm.config import VmConfig

DSA_BANDWIDTH = 64 << 20
#: DMA before the first update and between updates: a baseline to compare the blackouts with.
SETTLE_S = 0.6
VIEW_PERIOD_S = 0.1
OVERVIEW_BINS, OVERVIEW_MIN_BIN_S = 600, 0.02  # the whole run's timeline
ZOOM_S, ZOOM_BIN_S = 0.15, 0.005  # around each blackout
#: The heartbeat's pace around each update: the pre-pause window it is
#: compared with, and the horizon after the resume (luvmm.vmm.pace), in 10 ms bins.
PACE_BEFORE_S, PACE_AFTER_S, PACE_BIN_S = 0.45, 0.55, 0.01


class DemoError(RuntimeError):
    pass


def _phase_line(phases: dict) -> str:
    return " | ".join(f"{p} {phases[p] * 1000:.1f}" for p in PHASES if p in phases)


class TerminalView:
    """Progress and the device's DMA throughput (from the host, which the
    updates do not interrupt), redrawn in place on a terminal; one line per
    update everywhere (e.g. in CI logs)."""

    def __init__(self, host, bdf: str, cycles: int, out=sys.stdout):
        self.host, self.bdf, self.cycles, self.out = host, bdf, cycles, out
        self.tty = out.isatty()
        self.cycle = 0
        self.activity = "DMA running"
        self._last: tuple[float, int] | None = None
        self.throughput = 0.0

    def _sample(self) -> dict:
        status = self.host.call({"op": "status"})[0]
        dev = next(d for d in status["kernel"]["vfio"] if d["bdf"] == self.bdf)
        now = time.monotonic()
        if self._last is not None and now > self._last[0]:
            self.throughput = (dev["bytes"] - self._last[1]) / (now - self._last[0])
        self._last = (now, dev["bytes"])
        return dev

    async def run(self) -> None:
        while self.tty:
            dev = await trio.to_thread.run_sync(self._sample)
            self.out.write(f"\r\033[K  [{self.cycle}/{self.cycles}] {self.activity:<16} DMA "
                           f"{self.throughput / (1 << 20):6.1f} MiB/s  descriptors {dev['descriptors']:>9}  "
                           f"errors {dev['errors']}")
            self.out.flush()
            await trio.sleep(VIEW_PERIOD_S)

    def say(self, text: str) -> None:
        self.out.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.out.flush()

    def cycle_done(self, n: int, entry: dict) -> None:
        if "error" in entry:
            self.say(f"  update {n}: {entry['error']}")
            return
        from luvmm.metrics.report import dma_flowing

        verdict = "DMA kept flowing" if dma_flowing(entry) else "DMA STOPPED"
        lost = entry.get("guest_lost_s")
        guest_line = ("guest lost not measured" if lost is None else
                      f"guest lost {lost * 1000:.1f} ms (back at pace {recovery_ms(entry)} ms after the resume)")
        self.say(f"  update {n}: blackout {entry['blackout_s'] * 1000:.1f} ms, {guest_line}, {verdict} "
                 f"({entry['dma_completed_during_blackout']} descriptors completed while the VM was paused, "
                 f"longest DMA gap {entry['dma_max_gap_s'] * 1000:.1f} ms), errors/lost/corrupted "
                 f"{entry['dma_errors']}/{entry['dma_lost']}/{entry['dma_corrupted']}")
        self.say(f"           phases ms: {_phase_line(entry['phases_s'])}")


def _ports(metrics_port: str | None) -> tuple[str | None, str | None]:
    """The host's and the VM's metrics addresses: PORT and PORT+1."""
    if metrics_port is None:
        return None, None
    from luvmm.metrics.http import parse_listen

    address, port = parse_listen(metrics_port)
    return f"{address}:{port}", f"{address}:{port + 1}"


def run_demo(*, cycles: int = 5, profile: str = "continuous-dma", report_dir: str = "luvmm-report",
             memory: int = 256 << 20, guest_kind: str = "firmware", metrics_port: str | None = None,
             keep: bool = False, state_dir: str | None = None, overcommit: bool = False,
             guest_cpus: str | None = None, out=sys.stdout) -> dict:
    """Run the demo; returns {"summary", "report", "state_dir", "interrupted"}.

    Ctrl-C stops it between (or at the end of) updates: the report holds
    the updates done.  Whatever happens, the demo's host is stopped and a
    state dir it made is removed (unless ``keep``)."""
    fresh = state_dir is None
    if not fresh and hostctl.running(StateDir(state_dir)):
        raise DemoError(f"an emulated host already runs in {StateDir(state_dir).path}: the demo starts its own")
    state = StateDir(state_dir or tempfile.mkdtemp(prefix="luvmm-demo-"))
    host_metrics, vm_metrics = _ports(metrics_port)
    say = lambda text: (out.write(text + "\n"), out.flush())  # noqa: E731
    records: list[dict] = []
    interrupted = False
    host = None
    t0 = t1 = time.time()
    stack = contextlib.ExitStack()
    try:
        say(f"Starting an emulated host in {state.path} (kernel profile {profile}, one Intel DSA at "
            f"{DSA_BANDWIDTH >> 20} MiB/s" + (f"; the vCPU on CPU {guest_cpus}, the rest off it" if guest_cpus else "")
            + ")")
        hostctl.start(state, profile=profile, dsa_bandwidth=DSA_BANDWIDTH, metrics_port=host_metrics,
                      guest_cpus=guest_cpus)
        stack.enter_context(off_the_guest_cpus(guest_cpus))
        host = connect(state.socket)
        st = manage.start(state, VmConfig("demo", memory=memory, guest=guest_kind, metrics=vm_metrics), EmulatedUnits(host),
                          overcommit=overcommit)
        bdf = st["bdf"]
        say(f"VM 'demo' runs the {guest_kind} guest ({memory >> 20} MiB) with DSA {bdf} passed through; "
            f"the guest keeps {st['config']['slots']} DMA batches in flight")
        if metrics_port is not None:
            say(f"Prometheus metrics: http://{host_metrics}/metrics (host), http://{vm_metrics}/metrics (VM)")
        t0 = time.time()
        try:
            trio.run(_updates, host, bdf, state, cycles, out, records, profile)
        except KeyboardInterrupt:
            interrupted = True
            say(f"\nInterrupted: writing the report of the {len(records)} update(s) done")
        t1 = time.time()
        with _no_interrupts():
            summary = summarize([r for r in records if "error" not in r])
            summary["failed_updates"] = [r["error"] for r in records if "error" in r]
            timeline = _timelines(host, bdf, summary, t0, t1)
    finally:
        with _no_interrupts():
            stack.close()
            if host is not None:
                host.close_connection()
            if not keep:
                hostctl.stop(state)
                if fresh:
                    shutil.rmtree(state.path, ignore_errors=True)
    from luvmm.metrics.report import write_report

    meta = {"kernel_profile": profile, "guest": guest_kind, "memory_bytes": memory, "device": bdf,
            "dsa_bandwidth": DSA_BANDWIDTH, "cycles": cycles, "started": t0, "duration_s": t1 - t0,
            "host": "emulated", **run_metadata()}
    with _no_interrupts():
        index = write_report(report_dir, summary, timeline, meta)
    return {"summary": summary, "report": index, "state_dir": state.path, "interrupted": interrupted}


class _no_interrupts:
    """Clean-up that a second Ctrl-C must not cut short (the host's stop, the report)."""

    def __enter__(self):
        import signal

        self.previous = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc):
        import signal

        signal.signal(signal.SIGINT, self.previous)


def run_metadata() -> dict:
    """What a report needs to be compared with another: who ran what, where."""
    import os
    import platform
    import subprocess

    from luvmm import __version__

    commit = None
    try:
        top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        git = ["git", "-C", top]
        commit = subprocess.run(git + ["rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
        if commit and subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                     text=True, timeout=5).stdout.strip():
            commit += "-dirty"  # the figures are of a changed tree
    except (OSError, subprocess.SubprocessError):
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"luvmm_version": __version__, "luvmm_commit": commit, "cpu": cpu, "cpus": os.cpu_count(),
            "host_kernel": platform.release()}


async def _updates(host, bdf: str, state: StateDir, cycles: int, out, records: list, profile: str) -> None:
    """The updates, appended to ``records`` as each one ends (so that an
    interrupted demo keeps those done)."""
    view = TerminalView(host, bdf, cycles, out)
    kept = ("the VM's RAM, device and DMA are preserved by LUO/KHO" if profile == "continuous-dma" else
            "the VM's RAM and device are preserved by LUO/KHO, but this kernel profile resets the device at "
            "freeze: its DMA stops")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(view.run)
        view.say(f"Live-updating the host {cycles} times ({kept}):")
        for n in range(1, cycles + 1):
            view.activity = "DMA running"
            await trio.sleep(SETTLE_S)  # pacing: DMA before each update, for the plots
            view.cycle, view.activity = n, "live update..."
            try:
                record = await trio.to_thread.run_sync(update_once, state)
            except AgentError as e:
                records.append({"error": str(e)})
                view.cycle_done(n, {"error": f"failed: {e} (the VM was rolled back)"})
                continue
            records.append(record)
            view.cycle_done(n, summarize([record])["cycles"][0])
        view.activity = "DMA running"
        await trio.sleep(SETTLE_S)
        nursery.cancel_scope.cancel()


def _timelines(host, bdf: str, summary: dict, t0: float, t1: float) -> dict:
    """The bus observer's DMA and heartbeat timelines: the whole run, a
    zoom around each blackout, and the heartbeat's pace around each update
    (from before the window its pre-pause pace is taken over to past the
    horizon its guest_lost_s is measured over)."""
    iova = guest.offset("heartbeat")
    bin_s = max((t1 - t0) / OVERVIEW_BINS, OVERVIEW_MIN_BIN_S)
    overview = host.call({"op": "timeline", "bdf": bdf, "t0": t0, "t1": t1, "bin_s": bin_s, "iova": iova})[0]
    windows, zooms, paces = [], [], []
    for c in summary["cycles"]:
        if "error" in c:
            continue
        report = summary["updates"][c["cycle"] - 1]["reports"][c["vm"]]
        start = report["marks"]["old_stopped"]
        end = start + c["blackout_s"]
        windows.append({"cycle": c["cycle"], "start": start, "end": end})
        zooms.append(host.call({"op": "timeline", "bdf": bdf, "t0": start - ZOOM_S,
                                "t1": end + ZOOM_S, "bin_s": ZOOM_BIN_S, "iova": iova})[0])
        paces.append(host.call({"op": "timeline", "bdf": bdf, "t0": start - PACE_BEFORE_S,
                                "t1": end + PACE_AFTER_S, "bin_s": PACE_BIN_S, "iova": iova})[0])
    rule = {"before_s": pace.BEFORE_S, "window_s": pace.WINDOW_S, "recovered": pace.RECOVERED,
            "horizon_s": pace.LOST_HORIZON_S}
    return {"overview": overview, "blackouts": windows, "zooms": zooms, "paces": paces, "pace_rule": rule,
            "sample_period_s": 0.001}
