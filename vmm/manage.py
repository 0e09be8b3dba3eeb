"""`luvmm vm`: VMs as units of their host."""

from __future__ import annotations

import json
import shutil
import socket
import time

from liveupdate.agent_client import AgentClient
from liveupdate.state import StateDir, python_unit
from luvmm.wire import MAX_MESSAGE, decode_json, encode_json
from vmm.vm import VmConfig


class VmError(RuntimeError):
    pass


def unit_name(name: str) -> str:
    return f"vm-{name}"


def vmm_call(state: StateDir, name: str, request: dict, timeout: float = 10.0) -> dict:
    path = str(state.vm_dir(name) / "vmm.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.send(encode_json(request))
        reply = decode_json(s.recv(MAX_MESSAGE))
    if "errno" in reply:
        raise VmError(reply.get("error", "error"))
    return reply["ok"]


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


def start(state: StateDir, config: VmConfig, host, *, wait: float = 60.0, env: dict | None = None) -> dict:
    """Write the VM's config and unit, start it, wait until its guest runs."""
    config.check()
    if any(u["name"] == unit_name(config.name) for u in state.read_units()):
        raise VmError(f"VM {config.name!r} exists")
    vm_dir = state.vm_dir(config.name)
    vm_dir.mkdir(parents=True, exist_ok=True)
    (vm_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    argv, unit_env = python_unit("vmm.process", "--state-dir", state.path, "--name", config.name)
    # Restart=on-failure: a VMM that dies is started again, on the VM's files in the agent's fd store.
    state.write_unit(unit_name(config.name), argv, dict(unit_env, **(env or {})), restart="on-failure")
    try:
        host.call({"op": "unit-start", "name": unit_name(config.name)})
        return _wait_running(state, config, host, wait)
    except BaseException:
        stop(state, config.name, host)  # a VM that did not start leaves no unit behind
        raise


def _wait_running(state: StateDir, config: VmConfig, host, wait: float) -> dict:
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
            unit = next((u for u in host.call({"op": "units"})[0] if u["name"] == unit_name(config.name)), None)
            if unit and unit["returncode"] is not None:
                log = state.logs / f"{unit_name(config.name)}.log"
                lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
                cause = next((ln for ln in reversed(lines) if ln and not ln.startswith((" ", "---"))), "")
                raise VmError(f"the VMM exited with {unit['returncode']}: {cause} (see {log})") from None
        time.sleep(0.02)  # the VMM is another process booting its guest
    raise VmError(f"VM {config.name!r} did not come up in {wait:.0f} s ({last})")


def stop(state: StateDir, name: str, host) -> bool:
    if not state.remove_unit(unit_name(name)):
        return False
    host.call({"op": "unit-stop", "name": unit_name(name)})
    try:  # a VMM that had to be killed did not drop its stored files itself
        client = AgentClient(state)
        try:
            client.drop_fds(name)
        finally:
            client.close()
    except OSError:
        pass
    shutil.rmtree(state.vm_dir(name), ignore_errors=True)
    return True


def names(state: StateDir) -> list[str]:
    return [u["name"][3:] for u in state.read_units() if u["name"].startswith("vm-")]
