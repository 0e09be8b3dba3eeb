"""`luvmm bench load`: the guest's pace while clients hammer its VMM.

A VMM whose control plane shares the guest's path -- an interpreter lock
that every MMIO exit waits for -- slows its guest whenever someone looks at
it: a Prometheus scrape, a `luvmm vm status`.  This benchmark measures it
the way a user would see it: on a fresh emulated host, a VM with its
metrics served; its guest's heartbeat pace (the bus observer's samples)
over a window with nobody asking, then over a window of the same length in
which CLIENTS clients, threads of this process, each scrape the VM's
``/metrics`` and ask its VMM for its status (what `luvmm vm status` asks)
without pause -- off the CPUs set apart for the guest, where some are, as
the rest of such a host would be (luvmm.tools.bench.bench_host).  It prints
both paces, their ratio and how many requests were served; the windows
alternate (idle, loaded, idle, loaded...) so that the machine's own drift
is not taken for the load's effect.
"""

from __future__ import annotations

import http.client
import socket
import _thread
import time

from luvmm.tools.bench import bench_host
from luvmm.liveupdate.emu.client import connect
from luvmm.liveupdate.emu.services import EmulatedObserver
from luvmm.vmm import guest, manage
from luvmm.vmm.pace import Heartbeat


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Clients:
    """CLIENTS threads, each scraping /metrics and asking the VMM's status in turn."""

    def __init__(self, state, name: str, port: int, count: int):
        self.state, self.name, self.port, self.count = state, name, port, count
        self.stop = False
        self.scrapes = self.statuses = self.errors = 0
        self._lock = _thread.allocate_lock()
        self._done: list = []

    def _client(self, done) -> None:
        try:
            while not self.stop:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                    conn.request("GET", "/metrics")
                    ok = conn.getresponse().read() and True
                    conn.close()
                    manage.status(self.state, self.name)
                    with self._lock:
                        self.scrapes += ok
                        self.statuses += 1
                except (OSError, ValueError, manage.VmError):
                    with self._lock:
                        self.errors += 1
        finally:
            done.release()

    def __enter__(self):
        self.stop = False
        for _ in range(self.count):
            done = _thread.allocate_lock()
            done.acquire()
            self._done.append(done)
            _thread.start_new_thread(self._client, (done,))
        return self

    def __exit__(self, *exc) -> None:
        self.stop = True
        for done in self._done:
            done.acquire()
        self._done = []


def run_load(*, clients: int = 8, seconds: float = 2.0, rounds: int = 3, memory: int = 256 << 20,
             guest_cpus: str | None = None, progress=None) -> dict:
    """``rounds`` pairs of windows of ``seconds``: idle, then loaded by ``clients``."""
    port = _free_port()
    with bench_host(memory=memory, metrics=f"127.0.0.1:{port}", guest_cpus=guest_cpus) as state:
        name = "bench0"
        st = manage.wait_ready(state, name)
        bdf = st["bdf"]
        host = connect(state.socket)
        observer = EmulatedObserver(host)
        try:
            windows = []
            time.sleep(1.0)  # the guest past its start-up: what is measured is its steady state
            client_set = Clients(state, name, port, clients)
            for n in range(rounds):
                for loaded in (False, True):
                    t0 = time.time()
                    if loaded:
                        with client_set:
                            time.sleep(seconds)  # the window being measured
                    else:
                        time.sleep(seconds)  # the window being measured
                    windows.append({"loaded": loaded, "t0": t0, "t1": time.time()})
                if progress:
                    progress(f"round {n + 1}/{rounds}")
            time.sleep(0.05)  # the observer's last samples of the last window
            samples = observer.heartbeat(bdf, windows[0]["t0"] - 0.1, windows[-1]["t1"] + 0.05,
                                         guest.offset("heartbeat"))
        finally:
            host.close_connection()
    h = Heartbeat([(t, v) for t, v in samples])
    for w in windows:
        w["pace_hz"] = h.pace(w["t0"], w["t1"])
        subs = [h.pace(a, a + 0.1) for a in _steps(w["t0"], w["t1"] - 0.1, 0.1)]
        w["min_pace_100ms_hz"] = min((p for p in subs if p is not None), default=None)
    idle = [w["pace_hz"] for w in windows if not w["loaded"] and w["pace_hz"]]
    busy = [w["pace_hz"] for w in windows if w["loaded"] and w["pace_hz"]]
    ratios = [b / i for i, b in zip(idle, busy) if i]
    return {"clients": clients, "seconds": seconds, "rounds": rounds, "memory_bytes": memory,
            "scrapes": client_set.scrapes, "statuses": client_set.statuses, "errors": client_set.errors,
            "idle_pace_hz": idle, "loaded_pace_hz": busy, "ratios": [round(r, 4) for r in ratios],
            "ratio_min": round(min(ratios), 4) if ratios else None,
            "ratio_mean": round(sum(ratios) / len(ratios), 4) if ratios else None, "guest_cpus": guest_cpus,
            "windows": windows}


def _steps(a: float, b: float, step: float):
    while a <= b:
        yield a
        a += step


def format_load(result: dict) -> str:
    lines = [f"{'round':>5} {'idle pace /s':>14} {'loaded pace /s':>15} {'loaded/idle':>11}"]
    for n, (i, b, r) in enumerate(zip(result["idle_pace_hz"], result["loaded_pace_hz"], result["ratios"]), 1):
        lines.append(f"{n:>5} {i:>14,.0f} {b:>15,.0f} {r:>11.1%}")
    served = result["scrapes"] + result["statuses"]
    total_s = result["seconds"] * result["rounds"]
    lines.append(f"guest pace under load: {result['ratio_mean']:.1%} of idle on average, {result['ratio_min']:.1%} "
                 f"at worst ({result['clients']} clients: {result['scrapes']} scrapes of /metrics and "
                 f"{result['statuses']} status requests served, {served / total_s:,.0f}/s, {result['errors']} errors)")
    return "\n".join(lines)
