"""The LUO agent coordinating an update of several VMMs across a kexec."""

import errno
import os
import sys

import pytest

from luvmm.liveupdate.emu import hostctl
from luvmm.liveupdate.agent_client import AgentError, wait_for_agent
from luvmm.liveupdate.update import update_once
from tests.support.agent import add_fake_vm, registered

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def agent_host():
    import shutil
    import tempfile

    from luvmm.liveupdate.state import StateDir

    state = StateDir(tempfile.mkdtemp(prefix="luvmm-agent-"))
    state.ensure()
    yield state
    hostctl.stop(state)
    shutil.rmtree(state.path, ignore_errors=True)


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


def test_an_update_left_restoring_blocks_no_later_update(agent_host):
    """An update record left "restoring" (its VMs never all reported: one
    registered without a report, one never came back) is finished -- failed
    -- by the next update rather than blocking it."""
    import json
    import time

    from luvmm.liveupdate.agent import RESTORE_DEADLINE_S

    state = agent_host
    add_fake_vm(state, "x")
    state.write_unit("vm-y", [sys.executable, "-c", "raise SystemExit(78)"])  # never runs a VMM
    os.makedirs(os.path.join(state.path, "agent"), exist_ok=True)
    with open(os.path.join(state.path, "agent", "update.json"), "w") as f:
        json.dump({"id": "old", "vms": ["x", "y"], "phase": "restoring", "reports": {},
                   "kexec_started": time.time() - RESTORE_DEADLINE_S - 1}, f)
    hostctl.start(state)
    registered(state, ["x"])
    client, _ = wait_for_agent(state)
    try:
        old = client.call({"op": "status"})[0]["update"]
        assert old["reports"]["x"]["error"] == "x: not restored (its VMM started the VM anew)"
        with pytest.raises(AgentError) as e:  # y does not run: it cannot be prepared, but nothing is blocked
            client.call({"op": "update", "timeout": 2})
        assert e.value.errno == errno.ETIMEDOUT and "not registered with the agent: y" in str(e.value)
        old = client.call({"op": "status"})[0]["update"]
        assert old["id"] == "old" and old["phase"] == "failed" and "never restored it" in old["reports"]["y"]["error"]
        state.remove_unit("vm-y")
        assert update_once(state, timeout=30)["phase"] == "done"
    finally:
        client.close()


def test_a_vm_held_by_two_clients_blocks_the_update_until_both_let_go(agent_host):
    """Two `vm stop`s of one VM hold it at once; the second one, finding the
    VM gone already, leaves first.  The update waits for the other, still
    between killing the VMM and letting go of its session: the agent's hold
    was one per VM, and the first to leave let the update in -- the session
    went into the next kernel with no VM left to let go of it (the
    interleavings stress test)."""
    state = agent_host
    add_fake_vm(state, "a")
    hostctl.start(state)
    registered(state, ["a"])
    first, second, updater = (wait_for_agent(state)[0] for _ in range(3))
    try:
        first.hold("a")
        second.hold("a")
        second.close()  # its VM was gone: it touched nothing
        with pytest.raises(AgentError) as e:
            updater.call({"op": "update", "timeout": 1})
        assert e.value.errno == errno.EBUSY and "VM a is being started or stopped" in str(e.value)
        first.close()  # done (or died half-way): the VM is free
        assert update_once(state, timeout=30)["phase"] == "done"
    finally:
        for client in (first, second, updater):
            client.close()


def test_a_client_waiting_for_the_next_agent_does_not_hammer_the_old_one(agent_host, monkeypatch):
    """`luvmm update` waits for the agent of the next kernel by asking who
    answers; while the old one still does (its freeze, the kexec), it asks
    less and less often -- each look is on a CPU the blackout needs -- and
    says why it gave up."""
    from luvmm.liveupdate import agent_client

    state = agent_host
    hostctl.start(state)
    client, hello = wait_for_agent(state)
    client.close()
    asked = []
    real_hello = agent_client.AgentClient.hello
    monkeypatch.setattr(agent_client.AgentClient, "hello", lambda self: asked.append(1) or real_hello(self))
    with pytest.raises(AgentError) as e:
        wait_for_agent(state, 0.5, not_pid=hello["pid"])
    assert e.value.errno == errno.ETIMEDOUT and f"agent {hello['pid']} is still the old one" in str(e.value)
    # Polled at its first pace throughout, it would have asked ~500 times.
    assert 5 <= len(asked) <= 0.5 / agent_client.NEXT_AGENT_POLL_MAX_S + 10, len(asked)
