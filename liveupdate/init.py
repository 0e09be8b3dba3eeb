"""Init: the emulated host's userspace supervisor.

It starts every unit of the state dir's ``units/`` (the agent, one VMM per VM)
at boot and again after every kexec, with the environment a unit needs to
find its host (``LUVMM_HOST_SOCKET``, ``LUVMM_STATE_DIR``) and to know how it
was started (``LUVMM_BOOT`` = ``cold`` or ``kexec``, ``LUVMM_GENERATION``).
At kexec it SIGKILLs each unit's whole process group and waits for it: a
process of the old kernel does not survive, and neither does anything it did
not preserve.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import trio


class Init:
    def __init__(self, state, daemon):
        self.state = state
        self.daemon = daemon
        self.procs: dict[str, trio.Process] = {}
        self.started: dict[str, float] = {}
        self.starts: dict[str, int] = {}

    def _env(self, unit: dict, boot: str) -> dict[str, str]:
        env = dict(os.environ)
        # Units keep their compiled bytecode (in the state dir, not the source
        # tree): without it a restored VMM spends ~50 ms compiling its modules
        # again during the blackout.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(self.state.path) + "/pycache"
        env.update({str(k): str(v) for k, v in unit.get("env", {}).items()})
        env.update(LUVMM_HOST_SOCKET=self.state.socket, LUVMM_STATE_DIR=self.state.path, LUVMM_BOOT=boot,
                   LUVMM_GENERATION=str(self.daemon.generation), LUVMM_UNIT=unit["name"])
        return env

    async def _start(self, unit: dict, boot: str) -> int:
        name = unit["name"]
        log = open(self.state.logs / f"{name}.log", "ab")
        try:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} start ({boot}, generation "
                      f"{self.daemon.generation}) ---\n".encode())
            log.flush()
            proc = await trio.lowlevel.open_process(
                [str(a) for a in unit["argv"]], env=self._env(unit, boot), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        self.procs[name] = proc
        self.started[name] = time.time()
        self.starts[name] = self.starts.get(name, 0) + 1
        return proc.pid

    async def start_all(self, boot: str) -> None:
        for unit in self.state.read_units():
            if unit["name"] not in self.procs or self.procs[unit["name"]].returncode is not None:
                await self._start(unit, boot)

    async def start_unit(self, name: str) -> dict:
        unit = next((u for u in self.state.read_units() if u["name"] == name), None)
        if unit is None:
            raise FileNotFoundError(2, f"no unit {name!r}")
        proc = self.procs.get(name)
        if proc is not None and proc.returncode is None:
            return {"name": name, "pid": proc.pid, "already": True}
        return {"name": name, "pid": await self._start(unit, "cold")}

    async def _kill(self, proc: trio.Process) -> None:
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        await proc.wait()

    async def stop_unit(self, name: str) -> dict:
        proc = self.procs.pop(name, None)
        if proc is None:
            return {"name": name, "running": False}
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(5):
                await proc.wait()
        await self._kill(proc)
        return {"name": name, "returncode": proc.returncode}

    async def kill_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for proc in self.procs.values():
                nursery.start_soon(self._kill, proc)
        self.procs.clear()

    def status(self) -> list[dict]:
        out = []
        for unit in self.state.read_units():
            name = unit["name"]
            proc = self.procs.get(name)
            out.append({"name": name, "argv": unit["argv"], "pid": proc.pid if proc else None,
                        "running": proc is not None and proc.poll() is None,
                        "returncode": proc.poll() if proc else None, "starts": self.starts.get(name, 0)})
        return out
