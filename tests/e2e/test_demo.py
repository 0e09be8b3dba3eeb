"""`luvmm demo` as a new user runs it, and its report in a real browser."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
PLOTS = ("dma_timeline", "blackout_zoom", "guest_pace", "blackout_per_cycle", "phases")


def run_demo(report_dir, *args, timeout=240):
    proc = subprocess.run([sys.executable, "-m", "luvmm", "demo", "--report", str(report_dir), *args],
                          capture_output=True, text=True, timeout=timeout)
    return proc


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    report = tmp_path_factory.mktemp("report")
    proc = run_demo(report, "--cycles", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return report, proc.stdout


@pytest.mark.timeout(300)
def test_demo_shows_dma_flowing_through_every_blackout(demo_report):
    report, out = demo_report
    # The live view: one line per update with the blackout, what the guest lost after it, the DMA during it
    # and the phases.
    assert len(re.findall(r"update \d: blackout [\d.]+ ms, guest (lost [\d.]+ ms \(back at pace (>?[\d.]+) ms "
                          r"after the resume\)|lost not measured), DMA kept flowing", out)) == 3, out
    assert len(re.findall(r"phases ms: .*spawn [\d.]+ .*resume [\d.]+", out)) == 3, out
    assert "DMA kept flowing while the VM was paused in every one of the 3 live updates" in out
    assert f"file://{report}/index.html" in out
    summary = json.loads((report / "summary.json").read_text())
    assert summary["verdict"]["class"] == "good"
    cycles = summary["summary"]["cycles"]
    assert len(cycles) == 3 and len(summary["blackouts"]) == 3
    for c in cycles:
        assert c["dma_completed_during_blackout"] > 0 and c["guest_progressed"]
        assert c["dma_errors"] == c["dma_lost"] == c["dma_corrupted"] == 0
    # The guest ran before each update (the demo paces them): its outage was measured every time, and the
    # report shows it beside the blackout, and its pace around each update.
    assert all(0 <= c["guest_lost_s"] <= 0.5 for c in cycles)
    assert summary["summary"]["guest_lost_s"]["max"] == max(c["guest_lost_s"] for c in cycles)
    for w in summary["blackouts"]:
        assert 0 < w["end"] - w["start"] < 2
    page = (report / "index.html").read_text()
    assert re.search(r"id='guest_lost_s'><div class='value'>[\d.]+ ms</div><div class='what'>guest time lost", page)
    assert "the guest lost p50" in summary["verdict"]["text"]
    for name in PLOTS:
        png = (report / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
        assert f'id="{name}"' in page
    # Where and how it ran, said on the page: a reader can compare it with another run.
    import platform

    from luvmm import __version__

    meta = summary["meta"]
    assert meta["host"] == "emulated" and "the emulated host" in page and "takes milliseconds" in page
    assert meta["luvmm_version"] == __version__ and re.fullmatch(r"[0-9a-f]{12}(-dirty)?", meta["luvmm_commit"])
    assert meta["host_kernel"] == platform.release() and meta["host_kernel"] in page and meta["cpu"] in page
    assert "3 done of 3 asked" in page and "p99 (of 3)" in page
    # Self-contained: the plots are in the page, nothing is fetched.
    assert page.count('src="data:image/png;base64,') == len(PLOTS)
    assert not re.search(r'(src|href)="https?://', page)
    # The demo's host is gone, and its state dir with it.
    state_dir = re.search(r"Starting an emulated host in (\S+) ", out).group(1)
    assert not os.path.exists(state_dir)


@pytest.mark.timeout(300)
def test_demo_under_reset_on_freeze_reports_dma_stopping(tmp_path):
    proc = run_demo(tmp_path, "--cycles", "1", "--kernel-profile", "reset-on-freeze")
    assert proc.returncode == 4, proc.stdout + proc.stderr  # the documented finding: the device was reset
    assert "DMA STOPPED" in proc.stdout and "reset the device at freeze" in proc.stdout
    # The words are true: this profile does not preserve DMA.
    assert "DMA are preserved" not in proc.stdout and "resets the device at freeze: its DMA stops" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["verdict"]["class"] == "warn"
    cycle = summary["summary"]["cycles"][0]
    # The reset at freeze aborts the work in flight: what the device finished
    # during the blackout, it finished between the pause and the freeze, at
    # its rate (one batch of the default workload per batch's bytes).
    from luvmm.tools.demo import DSA_BANDWIDTH
    from luvmm.vmm.config import VmConfig

    workload = VmConfig("x")
    per_s = DSA_BANDWIDTH / (workload.pairs * workload.xfer)
    phases = cycle["phases_s"]
    before_freeze = phases["pause"] + phases["save"] + phases["freeze"]
    assert cycle["dma_lost"] > 0 and cycle["dma_completed_during_blackout"] <= before_freeze * per_s + 1, cycle
    assert 'class="verdict warn"' in (tmp_path / "index.html").read_text()


def test_demo_refuses_a_state_dir_with_a_running_host(emulated_host, tmp_path):
    proc = run_demo(tmp_path, "--state-dir", emulated_host.state.path, "--cycles", "1")
    assert proc.returncode == 1 and "already runs" in proc.stderr
    assert emulated_host.host.call({"op": "status"})[0]["kexec_count"] == 0  # left alone


def chromium(*args, timeout=120):
    home = tempfile.mkdtemp(prefix="luvmm-chromium-")
    try:
        return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                               "--no-first-run", f"--user-data-dir={home}", *args],
                              capture_output=True, text=True, timeout=timeout, env=dict(os.environ, HOME=home))
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.timeout(300)
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian's `chromium`; .ci/run installs it)")
def test_report_renders_its_plots_in_headless_chromium(demo_report, tmp_path):
    report, _ = demo_report
    url = f"file://{report}/index.html"
    dom = chromium("--virtual-time-budget=10000", "--window-size=1024,768", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-fits="true"' in dom.stdout  # nothing cut off at 1024 pixels (its tables fit)
    # The page's own script marks each image the browser decoded, with its size.
    assert f'data-plots-rendered="{len(PLOTS)}/{len(PLOTS)}"' in dom.stdout, dom.stdout[:500]
    for name in PLOTS:
        tag = re.search(rf'<img[^>]*id="{name}"[^>]*>', dom.stdout).group(0)
        width, height = map(int, re.search(r'data-rendered="(\d+)x(\d+)"', tag).groups())
        assert width > 400 and height > 200, (name, width, height)
    shot = tmp_path / "shot.png"
    rendered = chromium(f"--screenshot={shot}", "--window-size=1280,2000", "--virtual-time-budget=10000", url)
    assert rendered.returncode == 0 and shot.exists(), rendered.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))[..., :3]
    # The DMA plots' blue (#1f77b4, or its 80% fill over white) is on screen: not a blank or broken page.
    blue = 0
    for alpha in (1.0, 0.8):
        rgb = [alpha * c / 255 + (1 - alpha) for c in (0x1F, 0x77, 0xB4)]
        blue += ((abs(pixels[..., 0] - rgb[0]) < 0.06) & (abs(pixels[..., 1] - rgb[1]) < 0.06)
                 & (abs(pixels[..., 2] - rgb[2]) < 0.06)).sum()
    assert blue > 2000, blue


@pytest.mark.timeout(300)
def test_demo_live_view_on_a_terminal(tmp_path):
    """On a terminal the demo redraws a status line with the DMA throughput
    the host sees, during the updates too."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "luvmm", "demo", "--cycles", "1", "--report", str(tmp_path)],
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the demo closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(60) == 0, out.decode(errors="replace")
    text = out.decode(errors="replace")
    rates = [float(m) for m in re.findall(r"\r\x1b\[K  \[\d/1\] .*?DMA +([\d.]+) MiB/s", text)]
    assert len(rates) >= 3 and max(rates) > 1, text
    assert "live update..." in text and "update 1: blackout" in text
