"""Prometheus metrics: the state behind them, the HTTP endpoint, and the
endpoints of a real host and VMM across live updates."""

import json
import re
import shutil
import socket
import tempfile
import urllib.request
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from luvmm.liveupdate.emu import hostctl
from luvmm.liveupdate.state import StateDir
from luvmm.liveupdate.update import update_once
from luvmm.liveupdate.emu.client import connect
from luvmm.metrics import http
from luvmm.metrics.core import Histogram, registry_for
from luvmm.metrics.host import METRICS as HOST_METRICS
from luvmm.metrics.vmm import METRICS as VMM_METRICS
from luvmm.metrics.vmm import UpdateStats, VmmCollector
from luvmm.vmm import manage
from luvmm.vmm.report import PHASES
from luvmm.vmm.config import VmConfig
from tests.support.helpers import units

ROOT = Path(__file__).resolve().parent.parent.parent
REPORT = {"blackout_s": 0.045, "phases_s": {"pause": 0.0002, "spawn": 0.015}, "heartbeat_gap_s": 0.09,
          "dma_max_gap_s": 0.012, "dma_completed_during_blackout": 11, "dma_errors": 0, "dma_lost": 1,
          "dma_corrupted": 0, "guest_lost_s": 0.0031, "guest_recovery_s": 0.002}
MAILBOX = {"heartbeat": 10, "submitted": 40, "completed": 8, "inflight": 32, "errors": 0, "verify_failures": 0,
           "recoveries": 1}


def samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} of an exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(text: str, name: str, **labels) -> float:
    found = [v for (n, ls), v in samples(text).items() if n == name and set(labels.items()) <= ls]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


def test_histogram_buckets_are_cumulative_and_bounds_inclusive():
    h = Histogram((0.01, 0.05, 0.1))
    for v in (0.01, 0.02, 0.05, 0.2):
        h.observe(v)
    assert h.buckets() == [("0.01", 1), ("0.05", 3), ("0.1", 3), ("+Inf", 4)]
    assert h.count == 4 and h.total == pytest.approx(0.28)
    with pytest.raises(ValueError):
        Histogram((0.1,), counts=[1, 2, 3])


def test_update_stats_survive_a_save_and_refuse_a_damaged_file(tmp_path):
    stats = UpdateStats()
    stats.record(REPORT)
    stats.record(dict(REPORT, blackout_s=0.3, dma_lost=0))
    stats.record_rollback()
    path = str(tmp_path / "metrics.json")
    stats.save(path)
    again = UpdateStats.load(path)
    assert again.to_dict() == stats.to_dict()
    assert again.updates == {"success": 2, "rolled_back": 1} and again.dma_lost == 1
    assert again.blackout.count == 2 and again.phases["spawn"].count == 2 and again.phases["save"].count == 0
    assert again.last_blackout_s == 0.3 and again.dma_completed_during_blackout == 22
    assert UpdateStats.load(str(tmp_path / "none.json")).updates == {"success": 0, "rolled_back": 0}
    assert again.guest_lost.count == 2 and again.last_guest_lost_s == 0.0031
    # A report that could not measure the guest's outage: no "last" for it, the histograms as they were.
    stats.record(dict(REPORT, guest_lost_s=None, guest_recovery_s=None))
    assert stats.last_guest_lost_s is None and stats.guest_lost.count == 2 and stats.guest_recovery.count == 2
    # Measured, and not back at pace within the half second: in +Inf, the half second in the sum.
    stats.record(dict(REPORT, guest_lost_s=0.3, guest_recovery_s=None))
    assert stats.guest_recovery.buckets()[-2:] == [("0.5", 2), ("+Inf", 3)]
    assert stats.guest_recovery.total == pytest.approx(0.504) and stats.last_guest_recovery_s is None
    # The file of a luvmm that did not measure it still loads, its counters carrying on.
    old = {k: v for k, v in stats.to_dict().items() if not k.startswith(("guest_", "last_guest_"))}
    Path(path).write_text(json.dumps(old))
    loaded = UpdateStats.load(path)
    assert loaded.updates == {"success": 4, "rolled_back": 1} and loaded.blackout.count == 4
    assert loaded.guest_lost.count == 0 and loaded.last_guest_lost_s is None
    Path(path).write_text('{"version": 1, "blackout": {"counts": [1]')
    with pytest.raises(ValueError, match="damaged metrics state"):
        UpdateStats.load(path)
    Path(path).write_text(json.dumps(dict(stats.to_dict(), version=99)))
    with pytest.raises(ValueError, match="version 99"):
        UpdateStats.load(path)


def test_vmm_exposition_follows_prometheus_naming():
    stats = UpdateStats()
    stats.record(REPORT)
    text = http.respond(registry_for(VmmCollector("a", stats, lambda: MAILBOX, 1 << 30)),
                        b"GET /metrics HTTP/1.1\r\n\r\n").partition(b"\r\n\r\n")[2].decode()
    assert value(text, "luvmm_blackout_seconds_count", vm="a") == 1
    assert value(text, "luvmm_blackout_seconds_bucket", vm="a", le="0.05") == 1
    assert value(text, "luvmm_blackout_seconds_bucket", vm="a", le="0.04") == 0
    assert value(text, "luvmm_live_update_phase_seconds_sum", vm="a", phase="spawn") == pytest.approx(0.015)
    assert value(text, "luvmm_live_updates_total", vm="a", result="success") == 1
    assert value(text, "luvmm_live_updates_total", vm="a", result="rolled_back") == 0
    assert value(text, "luvmm_dma_lost_total", vm="a") == 1
    assert value(text, "luvmm_guest_batches_completed_total", vm="a") == 8
    assert value(text, "luvmm_vm_memory_bytes", vm="a") == 1 << 30
    assert value(text, "luvmm_last_guest_lost_seconds", vm="a") == pytest.approx(0.0031)
    assert value(text, "luvmm_last_guest_recovery_seconds", vm="a") == pytest.approx(0.002)
    assert value(text, "luvmm_guest_lost_seconds_bucket", vm="a", le="0.0025") == 0
    assert value(text, "luvmm_guest_lost_seconds_bucket", vm="a", le="0.005") == 1
    assert value(text, "luvmm_guest_recovery_seconds_count", vm="a") == 1
    names = {fam.name for fam in text_string_to_metric_families(text)}
    # Every declared metric is exported, and counters carry _total, time is in _seconds.
    assert {n.removesuffix("_total") for n in VMM_METRICS} == names
    for name, (kind, _) in {**VMM_METRICS, **HOST_METRICS}.items():
        assert name.startswith("luvmm_") and re.fullmatch(r"[a-z_]+", name)
        assert name.endswith("_total") == (kind == "counter"), name
        assert "_ms" not in name and "millis" not in name


def test_http_answers_like_a_server():
    registry = registry_for(VmmCollector("a", UpdateStats(), lambda: MAILBOX, 1 << 20))
    ok = http.respond(registry, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and b"text/plain; version=0.0.4" in ok
    head = http.respond(registry, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
    assert b"Content-Length: 0" not in head  # HEAD gives the length of what GET would send
    om = http.respond(registry, b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n")
    assert b"application/openmetrics-text" in om and om.rstrip().endswith(b"# EOF")
    assert http.respond(registry, b"GET /other HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert http.respond(registry, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert http.respond(registry, b"\x00garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert http.parse_listen("9100") == ("127.0.0.1", 9100)
    assert http.parse_listen("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert http.parse_listen("[::1]:9100") == ("::1", 9100)
    for bad in ("x", "1:99999", ""):
        with pytest.raises(ValueError):
            http.parse_listen(bad)


async def test_http_server_keeps_serving_after_bad_clients():
    registry = registry_for(VmmCollector("a", UpdateStats(), lambda: MAILBOX, 1 << 20))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(http.serve, registry, 0)
        hangup = await trio.open_tcp_stream("127.0.0.1", port)
        await hangup.send_all(b"GET /metr")
        await hangup.aclose()  # gone mid-request
        flood = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            await flood.send_all(b"X" * (http.MAX_REQUEST + 8192))  # no end of head: refused
        except trio.BrokenResourceError:
            pass
        await flood.aclose()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200") and b"luvmm_guest_heartbeats_total" in data
        nursery.cancel_scope.cancel()


def test_docs_list_every_metric():
    page = (ROOT / "docs" / "metrics-and-report.md").read_text()
    listed = set(re.findall(r"^\| `(luvmm_[a-z_]+)` \|", page, re.M))
    assert listed == set(VMM_METRICS) | set(HOST_METRICS)


def test_grafana_dashboard_queries_only_exported_metrics():
    dashboard = json.loads((ROOT / "metrics" / "grafana" / "luvmm.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for e in exprs for n in re.findall(r"luvmm_[a-z_]+", e)}
    assert used <= set(VMM_METRICS) | set(HOST_METRICS), used - set(VMM_METRICS) - set(HOST_METRICS)
    for headline in ("luvmm_blackout_seconds", "luvmm_live_update_phase_seconds", "luvmm_live_updates_total",
                     "luvmm_dma_errors_total", "luvmm_host_dsa_bytes_completed_total",
                     "luvmm_last_dma_completions_during_blackout"):
        assert headline in used
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_dashboard_imports_by_file_provisioning():
    """Provisioning does not fill in the UI's __inputs: the data source is a
    template variable, and every panel and query names it; quantiles are over
    a window of the buckets (their increase over the range, or a rate), not
    over the counters since the VMM's first update."""
    text = (ROOT / "metrics" / "grafana" / "luvmm.json").read_text()
    dashboard = json.loads(text)
    assert "__inputs" not in dashboard and "${DS_" not in text
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["vm"]["datasource"]["uid"] == "${datasource}"
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            for bucket in re.findall(r"histogram_quantile\(.*", target["expr"]):
                assert re.search(r"(increase|rate)\(luvmm_[a-z_]+_bucket(\{[^}]*\})?\[\$__(range|rate_interval)\]\)",
                                 bucket), target["expr"]
    provider = (ROOT / "metrics" / "grafana" / "provisioning" / "dashboards" / "luvmm.yaml").read_text()
    assert "providers:" in provider and "type: file" in provider


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


@pytest.mark.timeout(300)
def test_endpoints_of_a_host_and_a_vmm_count_on_across_live_updates(kvm_ok):
    """Counters only go up although every update replaces the VMM process."""
    state = StateDir(tempfile.mkdtemp(prefix="luvmm-metrics-"))
    try:
        hostctl.start(state, dsa_bandwidth=64 << 20, metrics_port=0)
        host = connect(state.socket)
        host_port = host.call({"op": "status"})[0]["metrics_port"]
        vm_port = free_port()
        st = manage.start(state, VmConfig("m", memory=64 << 20, metrics=str(vm_port)), units(host))
        assert st["metrics_port"] == vm_port and st["metrics_error"] is None
        before_vm, before_host = scrape(vm_port), scrape(host_port)
        assert value(before_vm, "luvmm_live_updates_total", vm="m", result="success") == 0
        for _ in range(2):
            update_once(state, timeout=60)
        assert manage.wait_ready(state, "m")["boot"] == "kexec"  # another process serves it now
        after_vm, after_host = scrape(vm_port), scrape(host_port)
        assert value(after_vm, "luvmm_live_updates_total", vm="m", result="success") == 2
        assert value(after_vm, "luvmm_blackout_seconds_count", vm="m") == 2
        assert 0 < value(after_vm, "luvmm_blackout_seconds_sum", vm="m") < 2
        for phase in PHASES[1:]:
            assert value(after_vm, "luvmm_live_update_phase_seconds_count", vm="m", phase=phase) == 2
        assert value(after_vm, "luvmm_dma_completions_during_blackout_total", vm="m") > 0
        # The first update came right after the VM started: too soon for a pace before its pause.
        # The second's outage was measured, and is what the "last" gauges say.
        assert value(after_vm, "luvmm_guest_lost_seconds_count", vm="m") >= 1
        assert 0 <= value(after_vm, "luvmm_last_guest_lost_seconds", vm="m") <= 0.5
        for bad in ("luvmm_dma_errors_total", "luvmm_dma_lost_total", "luvmm_dma_corrupted_total"):
            assert value(after_vm, bad, vm="m") == 0
        assert value(after_vm, "luvmm_guest_batches_completed_total", vm="m") > \
            value(before_vm, "luvmm_guest_batches_completed_total", vm="m")
        bdf = st["bdf"]
        assert value(after_host, "luvmm_host_kexec_total") == 2
        assert value(after_host, "luvmm_host_kexec_duration_seconds_count") == 2
        assert value(after_host, "luvmm_host_kernel_generation") == 3
        for counter in ("luvmm_host_dsa_descriptors_completed_total", "luvmm_host_dsa_bytes_completed_total"):
            assert value(after_host, counter, device=bdf) > value(before_host, counter, device=bdf)
        assert value(after_host, "luvmm_host_dsa_bus_master", device=bdf) == 1
        assert value(after_host, "luvmm_host_dsa_errors_total", device=bdf) == 0
        host.close_connection()
    finally:
        hostctl.stop(state)
        shutil.rmtree(state.path, ignore_errors=True)
