"""Running the `luvmm` command as a user does, and checking that it left
nothing behind (the ``cli`` fixture in conftest.py).

Each test gets a private directory that is the commands' TMPDIR and holds
their default state dir: what a command leaves -- a state dir, a temp dir,
a socket, a daemon or unit process (found by its command line naming that
directory) -- shows there, whatever else runs on the machine.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

LUVMM = [sys.executable, "-m", "luvmm"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def processes_naming(path: str) -> list[str]:
    """The command lines of the processes that name ``path``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if path in argv:
            found.append(f"{pid}: {argv[:200]}")
    return found


class Cli:
    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="lt-")  # short: Unix socket paths are limited
        self.state = os.path.join(self.root, "state")
        #: A real host's sockets (LUVMM_RUNTIME_DIR): here, not in this machine's /run/luvmm.
        self.runtime = os.path.join(self.root, "run")
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("XDG_RUNTIME_DIR", "LUVMM_STATE_DIR", "LUVMM_RUNTIME_DIR", "RUNTIME_DIRECTORY")}
        # The commands run from this checkout, whichever one pip installed.
        self.env.update(TMPDIR=self.root, LUVMM_STATE_DIR=self.state, LUVMM_RUNTIME_DIR=self.runtime,
                        PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
        self.outputs: list[tuple[list[str], str]] = []
        self.kept: set[str] = set()

    def __call__(self, *args: str, status: int | None = 0, timeout: float = 180, env: dict | None = None,
                 cwd: str | None = None) -> subprocess.CompletedProcess:
        """Run ``luvmm ARGS``; check its exit status unless ``status`` is None."""
        proc = subprocess.run(LUVMM + list(args), capture_output=True, text=True, timeout=timeout,
                              env=dict(self.env, **(env or {})), cwd=cwd or self.root)
        self.outputs.append((list(args), proc.stdout + proc.stderr))
        if status is not None:
            assert proc.returncode == status, (f"luvmm {' '.join(args)}: exit {proc.returncode}, want {status}\n"
                                               f"{proc.stdout}{proc.stderr}")
        return proc

    def error_line(self, proc: subprocess.CompletedProcess) -> str:
        """The one line a refused command says (and nothing on stdout)."""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        return lines[0]

    def spawn_on_pty(self, *args: str) -> "PtyProcess":
        return PtyProcess(LUVMM + list(args), dict(self.env), self.root)

    def keep(self, path: str) -> None:
        """A file the test made on purpose (not a leftover)."""
        self.kept.add(os.path.abspath(path))

    def leftovers(self) -> tuple[list[str], list[str]]:
        files = []
        for top, dirs, names in os.walk(self.root):
            # The runtime dir's directories are a host's, as /run/luvmm is (made
            # once, kept); what must not stay in it are its sockets and pidfiles.
            in_runtime = top == self.runtime or top.startswith(self.runtime + "/")
            for name in names if in_runtime else dirs + names:
                path = os.path.join(top, name)
                if path == self.runtime:
                    continue
                if not any(path == k or path.startswith(k + "/") or k.startswith(path + "/") for k in self.kept):
                    files.append(os.path.relpath(path, self.root))
        # What is left, said briefly: its top two levels.
        tops = sorted({"/".join(f.split("/")[:2]) for f in files})
        return processes_naming(self.root), tops[:30]

    def cleanup(self) -> None:
        if os.path.exists(os.path.join(self.state, "host.sock")):
            subprocess.run(LUVMM + ["host", "stop"], env=self.env, capture_output=True, timeout=60)
        for cmd in processes_naming(self.root):
            try:
                os.kill(int(cmd.split(":")[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


class PtyProcess:
    """A command on a terminal, as a user at a shell runs it (its own process
    group: Ctrl-C is SIGINT to that group)."""

    def __init__(self, argv, env, cwd):
        import pty

        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                                     start_new_session=True)
        os.close(slave)
        self.output = ""

    def expect(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.output)
            if m:
                return m
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not self._read(0):
                raise AssertionError(f"no {pattern!r} in the output:\n{self.output}")
            self._read(left)

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:  # the other end closed
            return False
        self.output += data.decode(errors="replace")
        return bool(data)

    def interrupt(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        while self._read(0):
            pass
        os.close(self.master)
        return self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
