"""Stand-in VMs (support/fake_vmm.py) for the agent's tests, and waiting for them to register."""

import os
import sys
import time

from luvmm.liveupdate.agent_client import wait_for_agent

HERE = os.path.dirname(os.path.abspath(__file__))


def add_fake_vm(state, name, **env):
    state.write_unit(f"vm-{name}", [sys.executable, os.path.join(HERE, "fake_vmm.py")],
                     {"FAKE_VM_NAME": name, **env})


def registered(state, names):
    client, _ = wait_for_agent(state, 30)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = client.call({"op": "status"})[0]
            if set(names) <= set(status["vmms"]):
                return status
            time.sleep(0.02)  # the VMMs are processes starting up
        raise AssertionError(f"VMMs did not register: {status}")
    finally:
        client.close()
