"""The VMM process: one per VM, a unit of its host's init.

    python -m vmm --state-dir DIR --name NAME

Cold boot builds the VM from ``DIR/vms/NAME/config.json``.  Restore mode --
init starts the unit with ``LUVMM_BOOT=kexec`` and the agent holds an incoming
session for the VM -- retrieves the session and its files, maps RAM, rebuilds
KVM and the vCPUs, binds and attaches the device, re-arms interrupts and
resumes the guest *before* trio (or anything else slow) is imported; only
then does the control plane start, verify the guest, FINISH the session and
report to the agent.
"""

from __future__ import annotations

import time

PROCESS_START = time.time()  # first thing: the restore path measures from here

import os  # noqa: E402
import sys  # noqa: E402

from liveupdate.agent_client import wait_for_agent  # noqa: E402
from liveupdate.luo import Session  # noqa: E402
from liveupdate.state import StateDir, parse_unit_args  # noqa: E402
from vmm.vm import Clock, Vm, VmConfig  # noqa: E402

IMPORTED = time.time()

def connect_host(args: dict, state: StateDir):
    if args["host"] == "real":
        from luvmm.host import RealHost

        return RealHost()
    from luvmm.emuhost import connect

    return connect(os.environ.get("LUVMM_HOST_SOCKET", state.socket))


def load_config(state: StateDir, name: str) -> VmConfig:
    import json

    return VmConfig.from_dict(json.loads((state.vm_dir(name) / "config.json").read_text()))


def main(argv: list[str] | None = None) -> int:
    args = parse_unit_args(sys.argv[1:] if argv is None else argv)
    name = args["name"]
    state = StateDir(args["state_dir"])
    clock = Clock()
    clock.mark("process_start", PROCESS_START)
    clock.mark("imported", IMPORTED)
    host = connect_host(args, state)
    clock.mark("host_connected")
    agent, _ = wait_for_agent(state, 30)
    clock.mark("agent_connected")
    incoming_fd = agent.retrieve_session(name) if os.environ.get("LUVMM_BOOT") == "kexec" else None
    clock.mark("connected")
    restored = None
    if incoming_fd is not None:
        incoming = Session(host, incoming_fd, name)
        vm, saved = Vm.restore(host, incoming, clock)  # the guest runs again when this returns
        restored = (incoming, saved)
    else:
        vm = Vm(host, load_config(state, name))
        vm.cold_boot()
        clock.mark("booted")
    # Only now the slow parts: logging, trio and the control plane.
    import logging

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s vmm[{name}] %(levelname)s %(message)s")
    from vmm.control import run_control_plane

    return run_control_plane(vm, host, state, name, agent, clock, restored)


if __name__ == "__main__":
    sys.exit(main())
