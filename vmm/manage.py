"""`luvmm vm`: VMs as units of their host."""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import socket
import time

from luvmm.liveupdate.agent_client import wait_for_agent
from luvmm.liveupdate.state import StateDir, check_vm_name, RESTART_MAX_DELAY_S, python_unit
from luvmm import rpc
from luvmm.wire import close_fds
from luvmm.vmm.config import VmConfig


class VmError(RuntimeError):
    def __init__(self, message: str, log: str | None = None):
        super().__init__(message)
        #: The log the message points to (kept when the VM and its host go).
        self.log = log


#: A VM unit's FileDescriptorStoreMax: its files (luvmm.vmm.vm.Vm.files) and their meta, with room to spare.
FDSTORE_MAX = 8
#: A VMM that fails this many times in a row the same way is not started
#: again (luvmm.liveupdate.init): `luvmm vm status` says what it died of.
SAME_FAILURE_LIMIT = 5


def unit_name(name: str) -> str:
    return f"vm-{name}"


def vmm_call(state: StateDir, name: str, request: dict, timeout: float = 10.0) -> dict:
    """A request to a VMM's vmm.sock (OSError if it does not answer, VmError if it refuses)."""
    path = state.vmm_socket(name)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            ok, fds = rpc.call(s, request, timeout=timeout, who=f"the VMM of {name}")
        except rpc.RpcError as e:
            if e.errno in (errno.ECONNRESET, errno.ETIMEDOUT):
                raise
            raise VmError(e.strerror) from None
    close_fds(fds)
    return ok


def status(state: StateDir, name: str) -> dict:
    return vmm_call(state, name, {"op": "status"})


def wait_ready(state: StateDir, name: str, timeout: float = 30.0) -> dict:
    """The VM's status once its control plane is up (after a start or a
    restore: registered with the agent, files stored, metrics served)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            st = status(state, name)
            if st["ready"]:
                return st
        except (OSError, ValueError):  # between two VMM processes
            pass
        if time.monotonic() > deadline:
            raise VmError(f"VM {name!r} was not ready in {timeout:.0f} s")
        time.sleep(0.01)  # polling another process


def machine_memory() -> int:
    """The host's RAM (MemTotal)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemTotal in /proc/meminfo")


def check_fits(state: StateDir, config: VmConfig) -> None:
    """Refuse a VM whose RAM, with that of the host's other VMs, is more than
    the machine has: its guest would be killed by the OOM killer, or kill
    others, once it touches it (a memfd is allocated as it is used)."""
    total = machine_memory()
    others = 0
    for name in state.vm_names():
        try:
            others += int(json.loads((state.vm_dir(name) / "config.json").read_text())["memory"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if config.memory + others > total:
        with_others = f" with the {others / GIB:.1f} GiB of the host's other VMs" if others else ""
        raise VmError(f"VM {config.name!r} needs {config.memory / GIB:.1f} GiB of RAM{with_others}, and the machine "
                      f"has {total / GIB:.1f} GiB: give it less (--memory) or allow it (--overcommit)")


GIB = float(1 << 30)


def start(state: StateDir, config: VmConfig, units, *, wait: float = 60.0, env: dict | None = None,
          overcommit: bool = False, host: str = "emulated") -> dict:
    """Write the VM's config and unit, start it, wait until its guest runs
    and its control plane is up.  A VM that does not come up whole (its
    guest crashed, its metrics endpoint could not be served) is stopped and
    removed: VmError says why.  ``host``: the kind of host its VMM runs on
    ("emulated", or "real": the running kernel; its unit's ``--host``)."""
    if host not in ("emulated", "real"):
        raise ValueError(f"host {host!r}: emulated or real")
    try:
        config.check()
    except ValueError as e:
        raise VmError(str(e)) from None
    if any(u["name"] == unit_name(config.name) for u in state.read_units()):
        raise VmError(f"VM {config.name!r} exists")
    if not overcommit:
        check_fits(state, config)
    argv, unit_env = python_unit("luvmm.vmm.process", "--state-dir", state.path, "--name", config.name,
                                 *(("--host", host) if host != "emulated" else ()))
    state.ensure()  # a real host's state dir is made by its first VM (0700)
    with held(state, config.name, units) as agent:  # none in progress; none starts before its guest runs
        try:
            state.make_dir("vms")
            state.make_dir(f"vms/{config.name}")
            state.write_file(f"vms/{config.name}/config.json", json.dumps(config.to_dict(), indent=2).encode())
            # Restart=on-failure: a VMM that dies is started again, on the VM's files in its unit's fd store.
            state.write_unit(unit_name(config.name), argv, dict(unit_env, **(env or {})), restart="on-failure",
                             fdstore_max=FDSTORE_MAX, pdeathsig="self", start_limit_burst=0,
                             restart_max_delay_sec=RESTART_MAX_DELAY_S, same_failure_limit=SAME_FAILURE_LIMIT,
                             # The metrics port is the unit's socket, bound and kept by init (luvmm.liveupdate.init).
                             sockets=[] if config.metrics is None else [
                                 {"name": "metrics", "listen": config.metrics if ":" in str(config.metrics)
                                  else f"127.0.0.1:{config.metrics}"}])
        except OSError as e:  # a full or read-only disk: nothing of the VM is left
            shutil.rmtree(state.vm_dir(config.name), ignore_errors=True)
            state.remove_unit(unit_name(config.name))
            raise VmError(f"cannot write the VM's definition in {state.path}: {e.strerror or e}") from None
        try:
            units.start(unit_name(config.name))
            st = _wait_running(state, config, units, wait, host)
            if st.get("metrics_error"):
                raise VmError(f"{st['metrics_error']}: the VM was not started")
            return st
        except BaseException:
            try:
                _remove(state, config.name, units, agent)  # a VM that did not start leaves no unit behind
            except OSError:  # init cannot stop what it could not start (no such unit): the error is the start's
                shutil.rmtree(state.vm_dir(config.name), ignore_errors=True)
            raise


def _wait_running(state: StateDir, config: VmConfig, units, wait: float, host: str = "emulated") -> dict:
    deadline = time.monotonic() + wait
    last = "not started"
    while time.monotonic() < deadline:
        try:
            st = status(state, config.name)
            if st["guest_state"] == "running" and st["ready"] or st["crash"]:
                if st["crash"]:
                    raise VmError(f"the guest crashed: {st['crash']}")
                return st
            last = st["guest_state"]
        except (OSError, ValueError) as e:
            last = str(e)
            unit = next((u for u in units.list() if u["name"] == unit_name(config.name)), None)
            if unit and unit["returncode"] is not None:
                log = state.logs / f"{unit_name(config.name)}.log"
                if not log.exists() and host == "real":  # systemd: the unit's output is in the journal
                    raise VmError(f"the VMM exited with {unit['returncode']} (see journalctl -u "
                                  f"{unit.get('unit') or f'luvmm-vm@{config.name}'})") from None
                lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
                cause = next((ln for ln in reversed(lines) if ln and not ln.startswith((" ", "---"))), "")
                # What the VMM said, once: "vmm[NAME]: cannot start the VM: why" -> "why".
                cause = cause.removeprefix(f"vmm[{config.name}]: ").removeprefix("cannot start the VM: ")
                raise VmError(f"{cause or 'its VMM exited'} (the VMM exited with {unit['returncode']}; its log: "
                              f"{log})", log=str(log)) from None
        time.sleep(0.02)  # the VMM is another process booting its guest
    raise VmError(f"VM {config.name!r} did not come up in {wait:.0f} s ({last})")


def stop(state: StateDir, name: str, units) -> bool:
    """Stop a VM for good and remove it: its unit (init no longer starts it),
    its VMM, what the agent holds for it (its LUO session -- and with it the
    preservation of its RAM and device --, its stored files, its channel) and
    its directory.  ``units`` (the host's init) None: no host runs, only the
    definition goes.  Refused (AgentError EBUSY, nothing changed) while an
    update is in progress."""
    check_vm_name(name)
    with held(state, name, units) as agent:
        return _remove(state, name, units, agent)


def _remove(state: StateDir, name: str, units, agent) -> bool:
    if not state.remove_unit(unit_name(name)):
        return False
    _let_go(state, name, units, agent)
    return True


def let_go(state: StateDir, name: str, units) -> None:
    """What :func:`stop` does once the VM's unit is gone, on the host of
    ``units``: a `vm stop` whose host went away after it removed the unit (a
    `host stop` at the same moment) does the rest on the host that runs now
    -- started meanwhile, it may have booted the VM from the unit before it
    was removed (the interleavings stress test found such a VMM running a VM
    no longer defined)."""
    with held(state, name, units) as agent:
        _let_go(state, name, units, agent)


def _let_go(state: StateDir, name: str, units, agent) -> None:
    if units is not None:
        units.stop(unit_name(name))
        if agent is not None:  # a VMM that had to be killed did not release its VM itself
            try:
                agent.release(name)
            except OSError:
                pass  # the agent went away: what it held went with it
    shutil.rmtree(state.vm_dir(name), ignore_errors=True)


#: How long `vm start` and `vm stop` wait for the host's agent to answer
#: (it is restarted at each kexec, and blocked in its kexec call while the
#: VMs are frozen) before going on without it: a host whose agent does not
#: come up makes no update either.
HOLD_WAIT_S = 30.0


@contextlib.contextmanager
def held(state: StateDir, name: str, units):
    """While a VM is started or stopped, the agent starts no update (and one
    in progress refuses it: AgentError EBUSY, before anything is touched).
    Yields the agent's client, None where there is none (no host, a host
    started without an agent, or one whose agent does not come up)."""
    agent = None
    if units is not None and any(u["name"] == "agent" for u in state.read_units()):
        try:
            agent = wait_for_agent(state, HOLD_WAIT_S)[0]
            agent.retry = True  # the agent it asked kexec'd meanwhile: ask the next one
            agent.hold(name)
        except OSError as e:
            if agent is not None:
                agent.close()
            if e.errno == errno.EBUSY:
                raise
            agent = None
    try:
        yield agent
    finally:
        if agent is not None:
            agent.close()


def names(state: StateDir) -> list[str]:
    return state.vm_names()
