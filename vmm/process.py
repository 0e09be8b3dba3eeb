"""The VMM process: one per VM, a unit of its host's init.

    python -m luvmm.vmm --state-dir DIR --name NAME

Cold boot builds the VM from ``DIR/vms/NAME/config.json``.  Restart
(``LUVMM_BOOT=restart``: init starts the unit again after its VMM died) picks
the VM up from the files the dead VMM left in its unit's file descriptor
store (luvmm.liveupdate.fdstore: init passes them back) -- same RAM, same device,
DMA never stopped -- and restarts the firmware on them (:meth:`Vm.recover`).  Restore mode --
init starts the unit with ``LUVMM_BOOT=kexec`` and the agent holds an incoming
session for the VM -- retrieves the session and its files, maps RAM, rebuilds
KVM and the vCPUs, binds and attaches the device, re-arms interrupts and
resumes the guest *before* anything slow is done; only then does the
control plane start -- trio, in a process of its own (luvmm.vmm.link, luvmm.vmm.control)
-- verify the guest, FINISH the session and report to the agent.  This
process holds the VM and answers its control plane until it is stopped.

Its metrics port is its unit's socket (``metrics``), which init binds and
passes to every process of the unit (luvmm.liveupdate.fdstore.SOCKETS): this
process keeps it for its control plane, which serves on it; it binds the
port itself only where no socket was passed (a VMM started by hand).
"""

from __future__ import annotations

import time

PROCESS_START = time.time()  # first thing: the restore path measures from here

import errno  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from luvmm.liveupdate import fdstore  # noqa: E402
from luvmm.liveupdate.agent_client import wait_for_agent  # noqa: E402
from luvmm.liveupdate.luo import Session  # noqa: E402
from luvmm.liveupdate.state import (  # noqa: E402
    StateDir,
    die_with_init,
    guests_first,
    parse_unit_args,
    use_every_cpu,
    record_imports,
    unit_boot,
)
from luvmm.wiring import connect  # noqa: E402
from luvmm.vmm.config import VmConfig  # noqa: E402
from luvmm.vmm.vm import Clock, Vm  # noqa: E402

IMPORTED = time.time()
EX_CONFIG = 78  # luvmm.liveupdate.init.EX_CONFIG (not imported: the restore path does not import init)

def load_config(state: StateDir, name: str) -> VmConfig:
    import json

    return VmConfig.from_dict(json.loads((state.vm_dir(name) / "config.json").read_text()))


def main(argv: list[str] | None = None) -> int:
    die_with_init()
    use_every_cpu()  # the restore's: the vCPUs pin themselves, the rest leaves them once they run
    args = parse_unit_args(sys.argv[1:] if argv is None else argv)
    name = args["name"]
    state = StateDir.of_host(args["state_dir"], args["host"])
    clock = Clock()
    clock.mark("process_start", PROCESS_START)
    clock.mark("imported", IMPORTED)
    host, services = connect(args["host"], os.environ.get("LUVMM_HOST_SOCKET", state.socket), state.path)
    clock.mark("host_connected")
    agent, hello = wait_for_agent(state, 30)
    agent.retry = True  # an agent that dies while we restore is started again by init
    clock.mark("agent_connected")
    # What init passed (LISTEN_FDS), its sockets apart -- before unit_boot: the socket passed at every
    # start is no sign of a restart, the fd store's files are.
    passed = fdstore.listen_fds()
    metrics_fd = fdstore.sockets(passed).get(fdstore.METRICS)
    boot = "restart" if passed else unit_boot()  # else LUVMM_BOOT, or what systemd's start says of it
    incoming_fd = agent.retrieve_session(name) if boot == "kexec" else None
    if incoming_fd is not None:
        try:  # init keeps it until the VM's files are stored (fdstore.INCOMING says why)
            fdstore.store({fdstore.INCOMING: incoming_fd}, replace=False)
        except OSError:
            pass  # no init keeps fds: as before, the agent's copy alone
    kept_session = passed.pop(fdstore.INCOMING, None)
    stored = fdstore.take(passed) if boot == "restart" else None
    if boot == "restart" and stored is None:
        # The VMM before us died restoring the VM after a kexec, before it
        # stored its files: the incoming session still holds them -- the one
        # init kept (the agent that handed it out may have died too), else
        # the agent's.
        incoming_fd = kept_session if kept_session is not None else agent.retrieve_session(name)
    elif kept_session is not None:
        os.close(kept_session)
    clock.mark("connected")
    restored = None
    if incoming_fd is not None:
        incoming = Session(host, incoming_fd, name)
        try:
            vm, saved = Vm.restore(host, incoming, clock)  # the guest runs again when this returns
        except (OSError, ValueError) as e:
            # Not booted cold over it: LUO keeps the VM's RAM and device in the
            # session, for a look at what went wrong.
            error = f"cannot restore the VM from its session: {e}"
            print(f"vmm[{name}]: {error}", file=sys.stderr)
            agent.restored(name, {"name": name, "error": error})
            return EX_CONFIG
        record_imports("vmm-resumed")
        # The guest runs: from here this thread (and what it starts) yields to
        # its vCPUs, and tells init (the emulated host gives their CPUs back).
        guests_first()
        fdstore.ready()
        agent.resumed(name)
        restored = (incoming, saved)  # its files are in the fd store already (live_update.restore_into says why)
    elif stored is not None:
        try:
            vm = Vm.recover(host, *stored, clock)
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise  # init tries again
            print(f"vmm[{name}]: cannot restart the VM: {e.strerror}", file=sys.stderr)
            return EX_CONFIG
        update = hello.get("update") or {}
        if update.get("phase") == "restoring" and name in update.get("vms", ()) \
                and name not in update.get("reports", {}):
            # The VMM that restored this VM died before it reported: the VM
            # runs on, but the update's measurements died with that VMM.
            agent.restored(name, {"name": name, "recovered": True,
                                  "error": f"{name}: its VMM died after the restore; restarted on its files"})
    else:
        if boot != "cold":
            print(f"vmm[{name}]: nothing to {'restore' if boot == 'kexec' else 'restart on'}: "
                  "booting the VM cold", file=sys.stderr)
        boot = "cold"
        try:
            vm = Vm(host, load_config(state, name))
            vm.cold_boot()
        except (OSError, ValueError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else e
            print(f"vmm[{name}]: cannot start the VM: {why}", file=sys.stderr)
            return EX_CONFIG  # init does not restart a VM that cannot start
        clock.mark("booted")
    if incoming_fd is None:  # booted or restarted: the guest runs
        guests_first()
        fdstore.ready()
    gc.enable()  # off since the unit started (luvmm.liveupdate.state.python_unit)
    # The control plane -- trio, the agent channel, vmm.sock, metrics -- in a
    # process of its own (luvmm.vmm.link says why); this one serves it what it
    # needs of the VM, importing nothing more.
    from luvmm.vmm.link import Link

    return Link(vm, host, services, state, name, agent, clock, restored, boot, args["host"], metrics_fd).run()


if __name__ == "__main__":
    sys.exit(main())
