import pytest

from luvmm.vmm.kvm import kvm_available


@pytest.fixture(scope="session")
def kvm_ok():
    ok, why = kvm_available()
    if not ok:
        pytest.skip(f"needs /dev/kvm: {why}")


@pytest.fixture
def rig():
    from tests.support.dsa_rig import make_rig

    r = make_rig()
    yield r
    r.close()


@pytest.fixture
def emulated_host(request):
    """A running emulated host daemon in a fresh state dir, and a client of it.

    Parametrize indirectly with a kernel profile name to pick the profile.
    """
    import shutil
    import tempfile
    from types import SimpleNamespace

    from luvmm.liveupdate.emu import hostctl
    from luvmm.liveupdate.state import StateDir
    from luvmm.liveupdate.emu.client import connect

    param = getattr(request, "param", "continuous-dma")
    options = dict(param) if isinstance(param, dict) else {"profile": param}
    profile = options.setdefault("profile", "continuous-dma")
    path = tempfile.mkdtemp(prefix="luvmm-test-")  # short: Unix socket paths are limited
    state = StateDir(path)
    hostctl.start(state, agent=False, **options)
    host = connect(state.socket)
    try:
        yield SimpleNamespace(state=state, host=host, profile=profile)
    finally:
        host.close_connection()
        hostctl.stop(state)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def vm_host(request):
    """A running emulated host with its LUO agent, for VMs: (state dir, host
    connection).  Its DSA moves 48 MiB/s: a guest's 32 batches in flight
    (2 MiB) outlast a blackout.  Parametrize indirectly with a kernel profile
    name, or a dict of luvmm.liveupdate.emu.hostctl.start options."""
    import shutil
    import tempfile

    from luvmm.liveupdate.emu import hostctl
    from luvmm.liveupdate.state import StateDir
    from luvmm.liveupdate.emu.client import connect

    param = getattr(request, "param", "continuous-dma")
    options = dict(param) if isinstance(param, dict) else {"profile": param}
    options.setdefault("dsa_bandwidth", 48 << 20)
    state = StateDir(tempfile.mkdtemp(prefix="luvmm-vm-"))
    hostctl.start(state, **options)
    host = connect(state.socket)
    try:
        yield state, host
    finally:
        host.close_connection()
        hostctl.stop(state)
        shutil.rmtree(state.path, ignore_errors=True)


@pytest.fixture
def cli():
    """`luvmm` as a user runs it (tests/cli.py), in a directory of its own that
    is its TMPDIR and holds its default state dir.  Afterwards: no output was
    a traceback, and nothing is left -- no process, socket, state or temp dir
    -- that the test did not keep on purpose."""
    from tests.support.cli import Cli

    c = Cli()
    try:
        yield c
        tracebacks = [" ".join(args) for args, out in c.outputs if "Traceback (most recent call last)" in out]
        assert not tracebacks, f"tracebacks from: {tracebacks}"
        procs, files = c.leftovers()
        assert not procs and not files, f"left behind: processes {procs}, files {files}"
    finally:
        c.cleanup()
