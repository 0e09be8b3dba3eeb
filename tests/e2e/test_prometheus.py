"""A real Prometheus server scrapes the demo's endpoints and answers PromQL
for blackout and DMA continuity, and for every query of the Grafana dashboard."""

import json
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

PROMETHEUS = shutil.which("prometheus")
ROOT = Path(__file__).resolve().parent.parent.parent
CYCLES = 3

pytestmark = pytest.mark.skipif(PROMETHEUS is None,
                                reason="needs a Prometheus server (Debian's `prometheus`; .ci/run installs it)")


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free loopback ports."""
    for _ in range(200):
        first = random.randrange(20000, 60000)
        socks = []
        try:
            for port in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


class Prometheus:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params):
        url = f"{self.base}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()

    def query(self, promql: str) -> list[dict]:
        reply = json.loads(self.get("/api/v1/query", query=promql))
        assert reply["status"] == "success", (promql, reply)
        return reply["data"]["result"]

    def scalar(self, promql: str) -> float:
        result = self.query(promql)
        assert len(result) == 1, (promql, result)
        return float(result[0]["value"][1])

    def wait(self, promql: str, predicate, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if result and predicate(float(result[0]["value"][1])):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql}: {result}")
            time.sleep(0.2)  # Prometheus scrapes on its own schedule


@pytest.fixture(scope="module")
def prometheus_and_demo(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("prometheus")
    metrics_port, prom_port = free_ports(2), free_ports(1)
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global:
  scrape_interval: 200ms
  scrape_timeout: 150ms
scrape_configs:
  - job_name: luvmm-host
    static_configs: [{{targets: ["127.0.0.1:{metrics_port}"]}}]
  - job_name: luvmm-vm
    static_configs: [{{targets: ["127.0.0.1:{metrics_port + 1}"]}}]
""")
    log = open(tmp_path / "prometheus.log", "wb")
    server = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=log, stderr=subprocess.STDOUT)
    prom = Prometheus(prom_port)
    state = tempfile.mkdtemp(prefix="luvmm-prom-")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                prom.get("/-/ready")
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "Prometheus did not get ready"
                time.sleep(0.1)  # another process starting
        demo = subprocess.run([sys.executable, "-m", "luvmm", "demo", "--cycles", str(CYCLES),
                               "--metrics-port", str(metrics_port), "--keep", "--state-dir", state,
                               "--report", str(tmp_path / "report")],
                              capture_output=True, text=True, timeout=240)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert f"http://127.0.0.1:{metrics_port}/metrics (host)" in demo.stdout
        yield prom
    finally:
        subprocess.run([sys.executable, "-m", "luvmm", "host", "stop", "--state-dir", state], capture_output=True)
        shutil.rmtree(state, ignore_errors=True)
        server.terminate()
        server.wait(30)
        log.close()


@pytest.mark.timeout(300)
def test_prometheus_scrapes_the_demo_and_answers_for_blackout_and_dma_continuity(prometheus_and_demo):
    prom = prometheus_and_demo
    prom.wait('luvmm_live_updates_total{result="success"}', lambda v: v == CYCLES)
    prom.wait("luvmm_host_kexec_total", lambda v: v == CYCLES)
    # Blackout.
    assert prom.scalar("luvmm_blackout_seconds_count") == CYCLES
    p50 = prom.scalar("histogram_quantile(0.5, sum by (le) (luvmm_blackout_seconds_bucket))")
    assert 0 < p50 < 1
    assert 0 < prom.scalar("luvmm_last_blackout_seconds") < 1
    # Beside it, the outage the guest saw (the demo lets its guest run before each update: every one measured).
    assert prom.scalar("luvmm_guest_lost_seconds_count") == CYCLES
    assert 0 <= prom.scalar("luvmm_last_guest_lost_seconds") <= 0.5
    phases = {r["metric"]["phase"] for r in prom.query("luvmm_live_update_phase_seconds_count > 0")}
    assert {"freeze", "kexec", "spawn", "start-up", "device_reattach", "resume"} <= phases
    # DMA continuity: the device completed work while the VM was paused, nothing was damaged,
    # and the guest's own counters never went back although each update replaced its VMM.
    assert prom.scalar("luvmm_dma_completions_during_blackout_total") > 0
    assert prom.scalar("luvmm_last_dma_completions_during_blackout") > 0
    assert prom.scalar("luvmm_dma_errors_total + luvmm_dma_lost_total + luvmm_dma_corrupted_total") == 0
    assert prom.scalar("resets(luvmm_guest_batches_completed_total[5m])") == 0
    assert prom.scalar('resets(luvmm_live_updates_total{result="success"}[5m])') == 0
    assert prom.scalar("increase(luvmm_guest_batches_completed_total[5m])") > 0
    # From the host, which the updates do not interrupt: DMA never stopped for two seconds.
    assert prom.scalar("min_over_time(rate(luvmm_host_dsa_bytes_completed_total[2s])[1m:200ms])") > 0
    assert prom.scalar("luvmm_host_dsa_errors_total") == 0


@pytest.mark.timeout(300)
def test_every_grafana_dashboard_query_answers(prometheus_and_demo):
    prom = prometheus_and_demo
    prom.wait('luvmm_live_updates_total{result="success"}', lambda v: v == CYCLES)
    dashboard = json.loads((ROOT / "metrics" / "grafana" / "luvmm.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            # Grafana's values: the dashboard's range (the run), and a rate window.
            expr = target["expr"].replace("$vm", ".*").replace("$__rate_interval", "2s").replace("$__range", "5m")
            assert not re.search(r"\$\w", expr), expr
            assert prom.query(expr), f"panel {panel['title']!r}: no data for {expr}"
