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
