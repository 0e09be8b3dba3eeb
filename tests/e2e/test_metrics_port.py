"""A VM's metrics port is its unit's socket, held by init (issue 24, item 5):
a local user looping bind() on it while `luvmm update` replaces the VMM
never gets it, so Prometheus never scrapes someone else's figures; a port
taken before `vm start` is refused in one line; and a VMM that has to bind
the port itself and cannot makes `luvmm update` fail, saying why.  Real
processes, the real CLI; the ``cli`` fixture checks nothing is left."""

import errno
import json
import socket
import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from luvmm import exitcodes
from luvmm.liveupdate.state import StateDir
from luvmm.vmm import manage
from tests.e2e.test_metrics import free_port

VM = ("vm", "start", "a", "--guest", "synthetic", "--memory", "64M")


def scrape(port: int) -> dict:
    """{(name, frozenset(labels)): value} of the exposition served on ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


class Squatter(threading.Thread):
    """A local user taking the port: bind(127.0.0.1:PORT) again and again,
    SO_REUSEADDR off, until stopped; a bind that succeeds is kept, listening
    (it would serve its own figures).  ``errors``: each failed bind's errno."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.done = threading.Event()
        self.errors: list[int] = []
        self.won: list[socket.socket] = []

    def run(self) -> None:
        while not self.done.is_set():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", self.port))
            except OSError as e:
                s.close()
                self.errors.append(e.errno)
            else:
                s.listen(16)
                self.won.append(s)
            time.sleep(0.001)  # a millisecond between tries: the port's window lasts hundreds of them

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=30)
        for s in self.won:
            s.close()


def listener_on(port: int) -> bool:
    """Whether a socket listens on 127.0.0.1:PORT (SO_REUSEADDR: a connection
    the VMM closed, in TIME_WAIT there for a minute, does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            assert e.errno == errno.EADDRINUSE, e
            return True
    return False


def test_a_local_user_never_takes_the_metrics_port_across_live_updates(cli):
    """No scrape before the squatter stops: a connection the VMM closed stays
    in TIME_WAIT on the port, and would refuse its binds by itself."""
    port = free_port()
    cli(*VM, "--metrics-port", str(port))
    assert listener_on(port)
    squatter = Squatter(port)
    squatter.start()
    try:
        done = cli("update", "--cycles", "3", "--json", timeout=600)
    finally:
        squatter.stop()
    assert not squatter.won, "a local user bound the VM's metrics port during a live update"
    assert len(squatter.errors) > 100 and set(squatter.errors) == {errno.EADDRINUSE}, set(squatter.errors)
    summary = json.loads(done.stdout)
    assert [c["metrics_error"] for c in summary["cycles"]] == [None, None, None]
    after = scrape(port)  # the VM's own metrics, served by the VMM of the third update
    assert after[("luvmm_live_updates_total", frozenset({("vm", "a"), ("result", "success")}))] == 3
    assert after[("luvmm_dma_corrupted_total", frozenset({("vm", "a")}))] == 0
    status = json.loads(cli("vm", "status", "a", "--json").stdout)["a"]
    assert status["boot"] == "kexec" and status["metrics_port"] == port and status["metrics_error"] is None
    cli("vm", "stop", "a")
    assert not listener_on(port)  # the VM stopped for good: its port went with its unit
    cli("host", "stop")


def test_a_metrics_port_taken_before_vm_start_is_refused_in_one_line(cli):
    cli("host", "start")
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen(1)
        proc = cli(*VM, "--metrics-port", str(port), status=exitcodes.FAILED)
    assert cli.error_line(proc) == (f"luvmm vm start: cannot listen on 127.0.0.1:{port} for VM a's metrics: "
                                    "Address already in use: the VM was not started")
    assert proc.stdout == ""
    assert json.loads(cli("vm", "list", "--json").stdout) == []  # nothing of the VM is left
    cli(*VM, "--metrics-port", str(port))  # the port free again: the same VM starts, on it
    assert scrape(port)[("luvmm_vm_memory_bytes", frozenset({("vm", "a")}))] == 64 << 20
    cli("vm", "stop", "a")
    cli("host", "stop")


def test_an_update_whose_vmm_cannot_serve_its_metrics_fails_saying_why(cli):
    """The port taken while no init held it (the host was stopped): init
    starts the VM's unit without its socket, the VMM binds the port itself
    and cannot -- the VM runs on, and `luvmm update` fails on it."""
    port = free_port()
    cli(*VM, "--metrics-port", str(port))
    cli("host", "stop")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen(1)
        cli("host", "start")
        st = manage.wait_ready(StateDir(cli.state), "a", timeout=120)
        assert st["guest_state"] == "running" and st["metrics_port"] is None
        assert st["metrics_error"] == f"cannot serve metrics on {port}: Address already in use"
        done = cli("update", "--json", status=exitcodes.FAILED, timeout=300)
        cycle = json.loads(done.stdout)["cycles"][0]
        assert cycle["vm"] == "a" and cycle["metrics_error"] == st["metrics_error"], cycle
        assert (cycle["dma_errors"], cycle["dma_lost"], cycle["dma_corrupted"]) == (0, 0, 0)
        line = cli.error_line(done)  # one line on stderr, the JSON on stdout
        assert line.startswith("luvmm") and line.endswith(
            f": 1 of 1 live update(s) left a VM without its metrics endpoint: a: {st['metrics_error']}"), line
        table = cli("update", "--last", status=exitcodes.FAILED).stdout
        assert f"a            {st['metrics_error']}" in table, table
    with open(f"{cli.state}/logs/vm-a.log") as f:
        assert f"init: started without its socket metrics: cannot listen on 127.0.0.1:{port}: " \
               "Address already in use" in f.read()
    cli("vm", "stop", "a")
    cli("host", "stop")
