"""Init: the emulated host's userspace supervisor.

It starts every unit of the state dir's ``units/`` (the agent, one VMM per VM)
at boot and again after every kexec, with the environment a unit needs to
find its host (``LUVMM_HOST_SOCKET``, ``LUVMM_STATE_DIR``) and to know how it
was started (``LUVMM_BOOT`` = ``cold`` or ``kexec``, ``LUVMM_GENERATION``).
At kexec it SIGKILLs each unit's whole process group: a process of the old
kernel does not survive, and neither does anything it did not preserve.

A unit with ``"restart": "on-failure"`` (systemd's Restart=on-failure) that
exits with a failure or is killed is started again with ``LUVMM_BOOT=restart``
-- unless it exits with EX_CONFIG (78: what it was asked to run cannot run;
systemd's RestartPreventExitStatus=)
-- at most RESTART_BURST times in RESTART_INTERVAL seconds (StartLimitBurst,
StartLimitIntervalSec).  A VMM started so picks its VM up from the agent's fd
store.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import trio

log = logging.getLogger("luvmm.init")
EX_CONFIG = 78  # sysexits.h: a unit that exits so is not restarted
RESTART_BURST = 5
RESTART_INTERVAL = 10.0


class UnitProcess:
    """A unit's process, started with posix_spawn and waited for through a pidfd.

    Not trio.lowlevel.open_process: that runs subprocess.Popen in a worker
    thread, and after a kexec the units' start is on the blackout's path --
    posix_spawn (vfork + exec) starts one in about a millisecond.
    """

    def __init__(self, argv: list[str], env: dict[str, str], log_fd: int):
        self.pid = os.posix_spawnp(argv[0], argv, env, setsid=True, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, log_fd, 1),
            (os.POSIX_SPAWN_DUP2, log_fd, 2),
        ])
        self.pidfd = os.pidfd_open(self.pid)
        self.returncode: int | None = None
        self._waiting: trio.Event | None = None  # set when the task reading the pidfd is done

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                trio.lowlevel.notify_closing(self.pidfd)
                os.close(self.pidfd)
        return self.returncode

    async def wait(self) -> int:
        """Any number of tasks may wait (the restart watcher, a kexec's reaping):
        one of them reads the pidfd, the others wait for it."""
        while self.poll() is None:
            if self._waiting is not None:
                await self._waiting.wait()
                continue
            self._waiting = waiting = trio.Event()
            try:
                await trio.lowlevel.wait_readable(self.pidfd)
            except trio.ClosedResourceError:
                pass  # poll() reaped it meanwhile
            finally:
                self._waiting = None
                waiting.set()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self.pidfd, sig)


class Init:
    def __init__(self, state, daemon):
        self.state = state
        self.daemon = daemon
        self.procs: dict[str, UnitProcess] = {}
        self.started: dict[str, float] = {}
        self.starts: dict[str, int] = {}
        self.restarts: dict[str, list[float]] = {}  # recent restarts, for the limit
        self.restart_count: dict[str, int] = {}
        self.nursery: trio.Nursery | None = None  # the daemon's: it watches units for the restart policy

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

    def _start(self, unit: dict, boot: str) -> int:
        name = unit["name"]
        log = os.open(self.state.logs / f"{name}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(log, f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} start ({boot}, generation "
                          f"{self.daemon.generation}) ---\n".encode())
            proc = UnitProcess([str(a) for a in unit["argv"]], self._env(unit, boot), log)
        finally:
            os.close(log)
        self.procs[name] = proc
        self.started[name] = time.time()
        self.starts[name] = self.starts.get(name, 0) + 1
        if unit.get("restart") == "on-failure" and self.nursery is not None:
            self.nursery.start_soon(self._watch, name, proc)
        return proc.pid

    async def _watch(self, name: str, proc: UnitProcess) -> None:
        code = await proc.wait()
        if self.procs.get(name) is not proc or code in (0, EX_CONFIG):
            return  # stopped, killed by a kexec, done, or not worth another try
        unit = next((u for u in self.state.read_units() if u["name"] == name), None)
        if unit is None or unit.get("restart") != "on-failure":
            return
        now = time.monotonic()
        recent = [t for t in self.restarts.get(name, []) if now - t < RESTART_INTERVAL]
        if len(recent) >= RESTART_BURST:
            log.error("unit %s failed %d times in %.0f s: not restarting it", name, len(recent), RESTART_INTERVAL)
            return
        self.restarts[name] = recent + [now]
        self.restart_count[name] = self.restart_count.get(name, 0) + 1
        log.warning("unit %s exited (%s): restarting it", name,
                    f"signal {-code}" if code < 0 else f"status {code}")
        self._start(unit, "restart")

    async def start_all(self, boot: str) -> None:
        # VMMs first: after a kexec each has its interpreter to start before it
        # needs the agent, and the agent starts faster than that.
        units = self.state.read_units()
        units.sort(key=lambda unit: unit["name"] == "agent")
        for unit in units:
            if unit["name"] not in self.procs or self.procs[unit["name"]].returncode is not None:
                self._start(unit, boot)

    async def start_unit(self, name: str) -> dict:
        unit = next((u for u in self.state.read_units() if u["name"] == name), None)
        if unit is None:
            raise FileNotFoundError(2, f"no unit {name!r}")
        proc = self.procs.get(name)
        if proc is not None and proc.returncode is None:
            return {"name": name, "pid": proc.pid, "already": True}
        return {"name": name, "pid": self._start(unit, "cold")}

    async def _kill(self, proc: UnitProcess) -> None:
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

    def unit_of(self, pid: int) -> str | None:
        """The unit whose process ``pid`` is, or descends from (None: no unit's).

        Membership by descent: what systemd's cgroups give a real host.  (A
        process that double-forks out of its unit is orphaned to pid 1 and
        becomes nobody's here; a cgroup it could not leave.)"""
        units = {proc.pid: name for name, proc in self.procs.items() if proc.returncode is None}
        for _ in range(64):
            if pid in units:
                return units[pid]
            if pid <= 1:
                return None
            try:
                with open(f"/proc/{pid}/stat") as f:
                    pid = int(f.read().rsplit(")", 1)[1].split()[1])  # the parent
            except (OSError, ValueError, IndexError):
                return None
        return None

    def kill_unit(self, name: str, why: str) -> None:
        """SIGKILL one unit's process group now (injected faults): the unit's
        restart policy decides what follows, as for any crash."""
        proc = self.procs.get(name)
        if proc is not None and proc.returncode is None:
            log.warning("%s: killing unit %s (pid %d)", why, name, proc.pid)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill_all(self) -> list[UnitProcess]:
        """SIGKILL every unit's process group.  Returns the processes to reap:
        the caller need not wait for their teardown (unmapping guest RAM takes
        milliseconds) before the new kernel's units start -- a SIGKILLed
        process never runs another instruction of its own."""
        procs = list(self.procs.values())
        for proc in procs:
            if proc.returncode is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.procs.clear()
        return procs

    @staticmethod
    async def reap(procs: list[UnitProcess]) -> None:
        for proc in procs:
            await proc.wait()

    def status(self) -> list[dict]:
        out = []
        for unit in self.state.read_units():
            name = unit["name"]
            proc = self.procs.get(name)
            out.append({"name": name, "argv": unit["argv"], "pid": proc.pid if proc else None,
                        "restarts": self.restart_count.get(name, 0),
                        "running": proc is not None and proc.poll() is None,
                        "returncode": proc.poll() if proc else None, "starts": self.starts.get(name, 0)})
        return out
