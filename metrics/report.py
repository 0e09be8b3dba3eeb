"""The live-update report: one self-contained HTML page with its plots
(`luvmm demo --report DIR`).

``DIR/index.html`` embeds every plot (PNG data URIs: it can be mailed or
attached to a ticket), and the same plots sit beside it as PNG files, with
``summary.json`` holding the figures they were drawn from.  The page marks
each plot it has decoded (``data-rendered`` on the image, and
``data-plots-rendered="N/M"`` on the body) so that a headless browser can
tell that it rendered, and whether it fits the window's width
(``data-fits``): its tables are cut to fit 1024 pixels.

The plots:
* dma_timeline.png: DMA throughput and guest activity over the whole run,
  the blackouts shaded: DMA goes on while the guest is paused;
* blackout_zoom.png: the same around each blackout, in 5 ms bins;
* guest_pace.png: the guest's heartbeat pace around each update (10 ms
  bins, against its pace before the pause), and what it lost after the
  resume -- the outage the guest saw, which a short blackout can hide;
* blackout_per_cycle.png: each update's blackout, split into its phases;
* phases.png: the median time of each phase.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time

from luvmm.liveupdate.update import LOST_HORIZON_MS, ms, outage_measured_by, p99_label, percentile, phase_values, recovery_ms
from luvmm.liveupdate.update import PHASES
from luvmm.outfiles import open_dir, write_in

EMULATED_NOTE = ("the emulated host (luvmm's emulated DSA, IOMMU, VFIO, iommufd, LUO/KHO and kexec): its kexec takes "
                 "milliseconds where a real one takes seconds, so these blackouts are the VMM's share of a real one")
#: the phases inside the blackout (pause and preserve come before it)
BLACKOUT_PHASES = PHASES[2:]
DMA_COLOR, GUEST_COLOR, BLACKOUT_COLOR = "#1f77b4", "#2ca02c", "#d62728"


def _mib_per_s(timeline: dict) -> list[float]:
    return [b / timeline["bin_s"] / (1 << 20) for b in timeline["bytes"]]


def _guest_activity(timeline: dict, sample_period: float) -> list[float]:
    """Share (%) of the observer's heartbeat samples in each bin that saw it move."""
    per_bin = max(timeline["bin_s"] / sample_period, 1.0)
    return [min(100.0, 100.0 * n / per_bin) for n in timeline.get("heartbeat_changes", [])]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_timeline(timeline: dict, t0: float):
    import matplotlib.pyplot as plt

    ov = timeline["overview"]
    xs = [ov["t0"] - t0 + (i + 0.5) * ov["bin_s"] for i in range(len(ov["bytes"]))]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 4.8), sharex=True, height_ratios=(2, 1))
    top.fill_between(xs, _mib_per_s(ov), step="mid", color=DMA_COLOR, alpha=0.8, label="DSA DMA throughput")
    top.set_ylabel("DMA MiB/s")
    activity = _guest_activity(ov, timeline["sample_period_s"])
    if activity:
        bottom.fill_between(xs, activity, step="mid", color=GUEST_COLOR, alpha=0.8, label="guest running")
    bottom.set_ylabel("guest %")
    bottom.set_ylim(0, 105)
    bottom.set_xlabel("seconds")
    for n, w in enumerate(timeline["blackouts"]):
        for ax in (top, bottom):
            ax.axvspan(w["start"] - t0, w["end"] - t0, color=BLACKOUT_COLOR, alpha=0.3,
                       label="VM paused (blackout)" if n == 0 and ax is top else None)
    top.legend(loc="lower right", fontsize=8)
    top.set_title("DMA through the passed-through DSA, and the guest's heartbeat, across the live updates")
    return fig


def _grid(n: int):
    """A figure of ``n`` small plots, four to a row (one per update)."""
    import matplotlib.pyplot as plt

    cols = min(n, 4) or 1
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes


def plot_zooms(timeline: dict, summary: dict):
    zooms, windows = timeline["zooms"][:8], timeline["blackouts"][:8]
    cycles = {c["cycle"]: c for c in summary["cycles"] if "error" not in c}
    fig, axes = _grid(len(zooms))
    for ax, z, w in zip(axes.flat, zooms, windows):
        xs = [(z["t0"] + (i + 0.5) * z["bin_s"] - w["start"]) * 1000 for i in range(len(z["bytes"]))]
        ax.bar(xs, _mib_per_s(z), width=z["bin_s"] * 1000, color=DMA_COLOR, label="DMA MiB/s")
        ax.axvspan(0, (w["end"] - w["start"]) * 1000, color=BLACKOUT_COLOR, alpha=0.3, label="VM paused")
        ax2 = ax.twinx()
        ax2.step(xs, _guest_activity(z, timeline["sample_period_s"]), where="mid", color=GUEST_COLOR, lw=1.2,
                 label="guest running %")
        ax2.set_ylim(0, 105)
        ax2.set_yticks([])
        c = cycles.get(w["cycle"], {})
        ax.set_title(f"update {w['cycle']}: {c.get('blackout_s', 0) * 1000:.1f} ms, "
                     f"{c.get('dma_completed_during_blackout', 0)} DMA done", fontsize=9)
        ax.set_xlabel("ms from the pause", fontsize=8)
        ax.tick_params(labelsize=7)
    axes.flat[0].set_ylabel("DMA MiB/s")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    handles, labels = [], []
    for a in (axes.flat[0], axes.flat[0].figure.axes[-1]):
        h, lab = a.get_legend_handles_labels()
        handles += h
        labels += lab
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    return fig


def plot_paces(timeline: dict, summary: dict):
    """The heartbeat's pace around each update, as a share of its pace over
    the 400 ms before the pause; what the guest lost after the resume shaded
    (luvmm.vmm.pace: the deficit under 100%, over half a second)."""
    rule = timeline.get("pace_rule") or {}  # luvmm.vmm.pace's, as the demo gathered them
    horizon, recovered = rule.get("horizon_s", 0.5), rule.get("recovered", 0.8)
    paces, windows = timeline.get("paces", [])[:8], timeline["blackouts"][:8]
    cycles = {c["cycle"]: c for c in summary["cycles"] if "error" not in c}
    fig, axes = _grid(len(paces))
    for ax, p, w in zip(axes.flat, paces, windows):
        c = cycles.get(w["cycle"], {})
        before = c.get("guest_pace_before_hz")
        raw = p.get("heartbeat_pace_hz") or []
        xs = [(p["t0"] + (i + 0.5) * p["bin_s"] - w["start"]) * 1000 for i in range(len(raw))]
        ys = [math.nan if v is None else (100.0 * v / before if before else v) for v in raw]
        resumed = (w["end"] - w["start"]) * 1000
        ax.axvspan(0, resumed, color=BLACKOUT_COLOR, alpha=0.3, label="VM paused")
        ax.step(xs, ys, where="mid", color=GUEST_COLOR, lw=1.2, label="heartbeat pace")
        if before:
            after = [(x, y) for x, y in zip(xs, ys) if resumed <= x <= resumed + horizon * 1000]
            ax.fill_between([x for x, _ in after], [min(y, 100.0) if y == y else 100.0 for _, y in after], 100.0,
                            step="mid", color=BLACKOUT_COLOR, alpha=0.15, label="guest time lost")
            ax.axhline(100, color="k", lw=0.6)
            ax.axhline(100 * recovered, color="k", ls="--", lw=0.6, label=f"{recovered:.0%} of the pace before")
            ax.set_ylim(0, 130)
        lost = c.get("guest_lost_s")
        ax.set_title(f"update {w['cycle']}: guest lost {ms(lost)} ms\nback at pace {recovery_ms(c)} ms after the resume",
                     fontsize=9)
        ax.set_xlabel("ms from the pause", fontsize=8)
        ax.tick_params(labelsize=7)
    axes.flat[0].set_ylabel("% of the pace before the pause")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    return fig


def plot_blackouts(summary: dict):
    import matplotlib.pyplot as plt

    cycles = [c for c in summary["cycles"] if "error" not in c]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    xs = [c["cycle"] for c in cycles]
    bottom = [0.0] * len(cycles)
    cmap = plt.get_cmap("tab20")
    for i, phase in enumerate(BLACKOUT_PHASES):
        heights = [c["phases_s"].get(phase, 0.0) * 1000 for c in cycles]
        ax.bar(xs, heights, bottom=bottom, color=cmap(i), label=phase)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.plot(xs, [c["blackout_s"] * 1000 for c in cycles], "k_", markersize=18, label="blackout")
    b = summary["blackout_s"]
    ax.axhline(b["p50"] * 1000, color="k", ls="--", lw=0.8, label=f"p50 {b['p50'] * 1000:.1f} ms")
    ax.set_xlabel("live update")
    ax.set_ylabel("ms")
    ax.set_xticks(xs)
    ax.set_title("Blackout per live update, by phase")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def phase_medians(summary: dict) -> dict[str, float]:
    per = phase_values(summary)
    return {p: percentile(per[p], 50) for p in PHASES if p in per}


def plot_phases(summary: dict):
    import matplotlib.pyplot as plt

    medians = phase_medians(summary)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = list(medians)[::-1]
    values = [medians[n] * 1000 for n in names]
    ax.barh(names, values, color=["#999999" if n in ("preserve", "pause") else DMA_COLOR for n in names])
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
    ax.set_xlabel("ms (median over the updates; grey: before the blackout)")
    ax.set_title("Where the blackout goes")
    fig.tight_layout()
    return fig


def dma_flowing(cycle: dict) -> bool:
    """DMA went on through the blackout: descriptors completed while the VM
    was paused, and none of the work in flight at the pause was dropped (a
    device reset at freeze completes a few, then aborts the rest)."""
    return cycle["dma_completed_during_blackout"] > 0 and cycle["dma_lost"] == 0


def verdict(summary: dict, meta: dict) -> tuple[str, str]:
    """(css class, sentence): what a stakeholder should take away."""
    cycles = [c for c in summary["cycles"] if "error" not in c]
    failed = len(summary.get("failed_updates", [])) + len(summary["cycles"]) - len(cycles)
    flowing = sum(1 for c in cycles if dma_flowing(c))
    bad = {k: sum(c[k] for c in cycles) for k in ("dma_errors", "dma_lost", "dma_corrupted")}
    b = summary["blackout_s"]
    tail = (f"Blackout p50 {b['p50'] * 1000:.1f} ms, {p99_label(len(cycles))} {b['p99'] * 1000:.1f} ms, "
            f"max {b['max'] * 1000:.1f} ms over {len(cycles)} live update(s)")
    lost = summary.get("guest_lost_s")
    tail += (f"; the guest lost p50 {lost['p50'] * 1000:.1f} ms, max {lost['max'] * 1000:.1f} ms after the resume."
             if lost else "; the guest's own outage was not measured.")
    damage = f"{bad['dma_errors']} DMA errors, {bad['dma_lost']} lost, {bad['dma_corrupted']} corrupted."
    if not cycles:
        return "bad", f"No live update completed ({failed} failed)."
    note = f" {failed} update(s) failed and were rolled back." if failed else ""
    if flowing < len(cycles) and meta.get("kernel_profile") == "reset-on-freeze":
        return "warn", (f"DMA stopped during {len(cycles) - flowing} of {len(cycles)} blackouts: the kernel reset "
                        f"the device at freeze (kernel profile reset-on-freeze) and the work in flight was "
                        f"aborted: {damage} {tail}{note}")
    if any(bad.values()):
        return "bad", f"DMA was damaged by the live updates: {damage} {tail}{note}"
    if flowing == len(cycles):
        return "good", (f"DMA kept flowing while the VM was paused in every one of the {len(cycles)} live updates; "
                        f"{damage} {tail}{note}")
    return "warn", f"DMA stopped during {len(cycles) - flowing} of {len(cycles)} blackouts. {damage} {tail}{note}"


def _headline(summary: dict) -> str:
    """The figures a reader looks for first, side by side: the blackout the
    VMM controls, and what the guest lost after it (the one that stands out)."""
    late = summary.get("guest_not_recovered") or 0

    def figure(key: str, what: str, note: str) -> str:
        p = summary.get(key)
        if p is not None:
            value, detail = f"{p['p50'] * 1000:.1f} ms", f"p50; max {p['max'] * 1000:.1f} ms"
        elif key == "guest_recovery_s" and late:
            value, detail = f"> {LOST_HORIZON_MS} ms", "in every update measured"
        else:
            value, detail = "not measured", ""
        return (f"<div class='figure' id='{key}'><div class='value'>{html.escape(value)}</div>"
                f"<div class='what'>{html.escape(what)}</div><div class='note'>{html.escape(detail)}</div>"
                f"<div class='note'>{html.escape(note)}</div></div>")

    source = outage_measured_by(summary)
    return ("<div class='figures'>"
            + figure("blackout_s", "blackout", "last vCPU stopped to first vCPU running again")
            + figure("guest_lost_s", "guest time lost",
                     "after the resume, at the heartbeat's pace before the pause"
                     + (f" (measured by {source})" if source else ""))
            + figure("guest_recovery_s", "back at pace", "resume to the heartbeat at 80% of its pace before"
                     + (f"; {late} update(s) not back within {LOST_HORIZON_MS} ms" if late else ""))
            + "</div>")


def _table(summary: dict) -> str:
    """Two tables that fit the page (no scrolling at 1024 px and up): each
    update's DMA continuity, and each update's phases."""
    head = ("<tr><th>update</th><th>VM</th><th>blackout ms</th><th>guest lost ms</th><th>back at pace ms</th>"
            "<th>DMA during blackout</th>"
            "<th>longest DMA gap ms</th><th>heartbeat gap ms</th><th>errors / lost / corrupted</th>"
            "<th>guest went on</th></tr>")
    phase_head = "<tr><th>update</th><th>VM</th>" + "".join(
        f"<th>{html.escape(p.replace('_', ' '))}</th>" for p in PHASES) + "</tr>"
    rows, phase_rows = [], []
    for c in summary["cycles"]:
        first = f"<td>{c['cycle']}</td><td>{html.escape(str(c['vm']))}</td>"
        if "error" in c:
            rows.append(f"<tr>{first}<td colspan='8'>{html.escape(c['error'])}</td></tr>")
            continue
        rows.append(
            f"<tr>{first}<td>{ms(c['blackout_s'])}</td><td><b>{ms(c.get('guest_lost_s'))}</b></td>"
            f"<td>{html.escape(recovery_ms(c))}</td><td>{c['dma_completed_during_blackout']}</td>"
            f"<td>{ms(c['dma_max_gap_s'])}</td><td>{ms(c['heartbeat_gap_s'])}</td>"
            f"<td>{c['dma_errors']} / {c['dma_lost']} / {c['dma_corrupted']}</td>"
            f"<td>{'yes' if c['guest_progressed'] else 'NO'}</td></tr>")
        phase_rows.append(f"<tr>{first}" + "".join(f"<td>{ms(c['phases_s'].get(p))}</td>" for p in PHASES)
                          + "</tr>")
    return (f"<table>{head}{''.join(rows)}</table>\n<h2>The phases of each update (ms)</h2>\n"
            f"<table class='phases'>{phase_head}{''.join(phase_rows)}</table>")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>luvmm live update report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
.verdict {{ padding: 0.8em 1em; border-radius: 6px; font-size: 1.1em; }}
.good {{ background: #e3f5e1; border-left: 6px solid #2ca02c; }}
.warn {{ background: #fff3d6; border-left: 6px solid #e6a100; }}
.bad {{ background: #fde2e1; border-left: 6px solid #d62728; }}
img.plot {{ max-width: 100%; display: block; margin: 1em 0; }}
table {{ border-collapse: collapse; font-size: 0.85em; max-width: 100%; }}
table.phases th {{ width: 5.5em; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
dl {{ display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }}
dt {{ font-weight: bold; }}
.figures {{ display: flex; flex-wrap: wrap; gap: 1em; margin: 1em 0; }}
.figure {{ flex: 1 1 14em; padding: 0.6em 1em; border: 1px solid #ccc; border-radius: 6px; }}
.figure .value {{ font-size: 2em; font-weight: bold; }}
.figure .what {{ font-weight: bold; }}
.figure .note {{ font-size: 0.85em; color: #555; }}
#guest_lost_s {{ border: 2px solid #d62728; }}
</style></head>
<body data-plots-rendered="0/{nplots}">
<h1>Live update with a passed-through DSA</h1>
<p class="verdict {vclass}" id="verdict">{vtext}</p>
{headline}
<dl>{meta}</dl>
{plots}
<h2>Every update</h2>
{table}
<p>Blackout: last vCPU stopped to first vCPU running again. Guest lost: the guest time lost in the half second
after the resume, at the pace its heartbeat kept over the 400 ms before the pause; back at pace: from the resume
until that pace, over 50 ms, is back to 80% of it. DMA and heartbeat are seen by an observer on the emulated
machine's bus, not by the software being measured. Figures in <a href="summary.json">summary.json</a>.</p>
<script>
window.addEventListener("load", function () {{
  var plots = document.querySelectorAll("img.plot"), ok = 0;
  plots.forEach(function (img) {{
    if (img.complete && img.naturalWidth > 0) {{
      img.dataset.rendered = img.naturalWidth + "x" + img.naturalHeight; ok++;
    }}
  }});
  document.body.dataset.plotsRendered = ok + "/" + plots.length;
  // Whether the page fits the window's width (nothing cut off, no sideways scrolling).
  document.body.dataset.fits = String(document.documentElement.scrollWidth <= window.innerWidth);
}});
</script>
</body></html>
"""


def write_report(directory: str, summary: dict, timeline: dict, meta: dict) -> str:
    """Write DIR/index.html, the PNGs and summary.json; returns the index's
    path.  Each file is made new and renamed into place (luvmm.outfiles):
    never written through a symlink someone planted in DIR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dirfd = open_dir(directory, create=True)  # UnsafeOutput: not a directory luvmm may write in
    try:
        return _write_report(dirfd, directory, summary, timeline, meta, plt)
    finally:
        os.close(dirfd)


def _write_report(dirfd: int, directory: str, summary: dict, timeline: dict, meta: dict, plt) -> str:
    figures = [("dma_timeline.png", "DMA throughput and guest activity over the run, blackouts shaded",
                lambda: plot_timeline(timeline, meta["started"])),
               ("blackout_zoom.png", "Around each blackout (5 ms bins)", lambda: plot_zooms(timeline, summary)),
               ("guest_pace.png", "The guest's heartbeat pace around each update, and the time it lost",
                lambda: plot_paces(timeline, summary)),
               ("blackout_per_cycle.png", "Blackout per live update, by phase", lambda: plot_blackouts(summary)),
               ("phases.png", "Median time of each phase", lambda: plot_phases(summary))]
    if not timeline["blackouts"]:
        figures = figures[:1]
    plots = []
    for filename, title, draw in figures:
        fig = draw()
        data = _png(fig)
        plt.close(fig)
        write_in(dirfd, filename, data)  # never through a symlink planted there
        plots.append(f'<h2>{html.escape(title)}</h2>\n<img class="plot" id="{filename[:-4]}" alt="{html.escape(title)}" '
                     f'src="data:image/png;base64,{base64.b64encode(data).decode()}">')
    vclass, vtext = verdict(summary, meta)
    done = sum(1 for c in summary["cycles"] if "error" not in c)
    facts = {"host": EMULATED_NOTE if meta.get("host", "emulated") == "emulated" else meta["host"],
             "kernel profile": meta["kernel_profile"], "guest": f"{meta['guest']}, {meta['memory_bytes'] >> 20} MiB",
             "device": f"Intel DSA {meta['device']} at {meta['dsa_bandwidth'] >> 20} MiB/s (emulated)",
             "live updates": f"{done} done of {meta['cycles']} asked" + (
                 f"; blackout figures over {done} sample(s): {p99_label(done)} is their maximum" if done < 100
                 else ""),
             "luvmm": f"{meta.get('luvmm_version', '?')}, commit {meta.get('luvmm_commit') or 'unknown'}",
             "machine": f"{meta.get('cpu', '?')}, {meta.get('cpus', '?')} CPUs, host kernel "
                        f"{meta.get('host_kernel', '?')}",
             "run": f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(meta['started']))}"
             f", {meta['duration_s']:.1f} s"}
    page = PAGE.format(nplots=len(plots), vclass=vclass, vtext=html.escape(vtext),
                       meta="".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in facts.items()),
                       headline=_headline(summary), plots="\n".join(plots), table=_table(summary))
    write_in(dirfd, "index.html", page.encode())
    write_in(dirfd, "summary.json", json.dumps({"meta": meta, "verdict": {"class": vclass, "text": vtext},
                                                "summary": summary, "blackouts": timeline["blackouts"]},
                                               indent=1).encode())
    return os.path.join(directory, "index.html")
