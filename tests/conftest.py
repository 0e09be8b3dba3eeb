import pytest

from vmm.kvm import kvm_available


@pytest.fixture(scope="session")
def kvm_ok():
    ok, why = kvm_available()
    if not ok:
        pytest.skip(f"needs /dev/kvm: {why}")


@pytest.fixture
def rig():
    from tests.dsa_rig import make_rig

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

    from liveupdate import hostctl
    from liveupdate.state import StateDir
    from luvmm.emuhost import connect

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
