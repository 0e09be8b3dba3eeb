"""The LUO agent coordinating an update of several VMMs across a kexec."""

import errno
import os
import sys

import pytest

from liveupdate import hostctl
from liveupdate.agent_client import AgentError, wait_for_agent
from liveupdate.update import update_once

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def agent_host():
    import shutil
    import tempfile

    from liveupdate.state import StateDir

    state = StateDir(tempfile.mkdtemp(prefix="luvmm-agent-"))
    state.ensure()
    yield state
    hostctl.stop(state)
    shutil.rmtree(state.path, ignore_errors=True)


def add_fake_vm(state, name, **env):
    state.write_unit(f"vm-{name}", [sys.executable, os.path.join(HERE, "fake_vmm.py")],
                     {"FAKE_VM_NAME": name, **env})


def registered(state, names):
    client, _ = wait_for_agent(state, 30)
    try:
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = client.call({"op": "status"})[0]
            if set(names) <= set(status["vmms"]):
                return status
            time.sleep(0.02)  # the VMMs are processes starting up
        raise AssertionError(f"VMMs did not register: {status}")
    finally:
        client.close()


def test_update_two_vms_twice(agent_host):
    state = agent_host
    add_fake_vm(state, "a")
    add_fake_vm(state, "b")
    hostctl.start(state)
    for cycle in range(2):
        registered(state, ["a", "b"])
        result = update_once(state, timeout=60)
        assert result["phase"] == "done" and sorted(result["vms"]) == ["a", "b"]
        for name in ("a", "b"):
            assert result["reports"][name]["data_ok"] and result["reports"][name]["boot"] == "kexec"


def test_a_failed_prepare_rolls_back(agent_host):
    state = agent_host
    add_fake_vm(state, "good")
    add_fake_vm(state, "bad", FAKE_VM_FAIL_PREPARE="1")
    hostctl.start(state)
    registered(state, ["good", "bad"])
    client, hello = wait_for_agent(state)
    with pytest.raises(AgentError) as e:
        client.call({"op": "update", "timeout": 30})
    assert "rolled back" in str(e.value) and e.value.errno == errno.EIO
    assert os.path.exists(os.path.join(state.path, "good.cancelled"))  # the prepared VM resumed
    assert client.hello()["pid"] == hello["pid"]  # no kexec happened
    client.close()
