"""A stand-in VMM for the agent's tests: a unit that registers with the agent,
preserves a memfd on prepare, and after the kexec retrieves it, checks it,
finishes its session and reports."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from luvmm.liveupdate.emu.client import connect  # noqa: E402
from luvmm.liveupdate.agent_client import AgentClient, wait_for_agent  # noqa: E402
from luvmm.liveupdate.luo import Session  # noqa: E402
from luvmm.liveupdate.state import StateDir  # noqa: E402

NAME = os.environ.get("FAKE_VM_NAME", "fake")
FAIL_PREPARE = os.environ.get("FAKE_VM_FAIL_PREPARE") == "1"
PATTERN = NAME.encode() * 1000


def main() -> None:
    state = StateDir(os.environ["LUVMM_STATE_DIR"])
    host = connect(os.environ["LUVMM_HOST_SOCKET"])
    agent, _ = wait_for_agent(state, 30)
    report = {"boot": os.environ["LUVMM_BOOT"], "pid": os.getpid()}
    incoming = agent.retrieve_session(NAME)
    if incoming is not None:
        session = Session(host, incoming, NAME)
        fd = session.retrieve_fd(1)
        report["data_ok"] = os.pread(fd, len(PATTERN), 0) == PATTERN
        session.finish()
        agent.restored(NAME, report)
    session = Session(host, agent.create_session(NAME)[0], NAME)
    channel = AgentClient(state)
    channel.call({"op": "register", "name": NAME})
    resumed = 0
    while True:
        request, fds = channel.recv()
        if request is None:
            return
        if request["op"] == "ready":
            channel.send({"ok": True})
        elif request["op"] == "prepare":
            if FAIL_PREPARE:
                channel.send({"errno": 5, "error": "refusing to prepare (test)"})
                continue
            mem = os.memfd_create(NAME)
            os.write(mem, PATTERN)
            session.preserve_fd(mem, 1)
            channel.send({"ok": {"ready": True}})
        elif request["op"] == "cancel":
            resumed += 1
            with open(os.path.join(state.path, f"{NAME}.cancelled"), "w") as f:
                json.dump({"resumed": resumed}, f)
            channel.send({"ok": True})


if __name__ == "__main__":
    main()
