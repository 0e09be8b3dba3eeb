"""`luvmm boot`: the start-up luvmm's systemd units do, on a real host
without systemd (luvmm.liveupdate.boot: luvmm's own init over the real kernel).

By default it daemonizes -- fork, setsid, fork again: the init is no
session leader, so it can never take a terminal; stdin /dev/null, stdout
and stderr to ``boot.log`` in the state dir -- and returns once the init
answers on ``init.sock`` and has spawned its units, or says in one line why
it did not (and leaves nothing behind).  ``--foreground`` runs the init in
this process, for an rc script or an inittab line that supervises it.
"""

from __future__ import annotations

import argparse
import os
import select
import sys

from luvmm import exitcodes
from luvmm.cli.common import CliError, guest_cpus_arg, positive_seconds, say

#: A real host's state dir (luvmm/wiring/systemd.py's STATE_DIR too).
DEFAULT_STATE_DIR = "/var/lib/luvmm"


def _state(args: argparse.Namespace):
    from luvmm.liveupdate.state import StateDir

    return StateDir.of_host(args.state_dir or os.environ.get("LUVMM_STATE_DIR") or DEFAULT_STATE_DIR, "real")


def _ensure(state) -> bool:
    """Make the state dir usable (CliError saying why not); True if it was created now."""
    from luvmm.liveupdate.state import StateError

    created = not os.path.lexists(state.path)
    try:
        state.ensure()
    except StateError as e:
        hint = "" if os.geteuid() == 0 else " (a real host's init runs as root; or give --state-dir)"
        raise CliError(f"{e}{hint}") from None
    return created


def _build_uapi_cache() -> None:
    """The units run with -S and import the parsed uAPI instead of parsing it
    on the restore path (as `luvmm host start` does for the emulated host's)."""
    from luvmm import abi

    if abi.PREBUILT and os.path.exists(abi._CACHE):
        return
    from luvmm.uapi import build_cache

    try:
        build_cache()
    except OSError as e:  # a read-only install: the units parse it themselves, slower
        say(f"luvmm boot: cannot write the parsed uAPI ({e.strerror or e}): the units parse it at start")


def _cmd_boot(args: argparse.Namespace) -> int:
    from luvmm.liveupdate import boot

    if args.host != "real":
        raise CliError(f"--host {args.host}: `luvmm boot` runs luvmm's init over the real kernel; the emulated "
                       "host has its own (`luvmm host start`)", exitcodes.USAGE)
    state = _state(args)
    if args.stop:
        return _stop(state, args.timeout)
    if args.guest_cpus:  # its init passes its environment on to every unit
        from luvmm.liveupdate.state import GUEST_CPUS_ENV

        os.environ[GUEST_CPUS_ENV] = args.guest_cpus
    pid = boot.running(state) if os.path.isdir(state.path) else None
    if pid is not None:
        raise CliError(str(boot.AlreadyRunning(state, pid if pid > 0 else None)))
    from luvmm.liveupdate.emu import hostctl

    if os.path.isdir(state.path) and hostctl.running(state):  # its init's notify.sock, its agent.sock
        raise CliError(f"an emulated host runs in {state.path}: `luvmm boot` needs a state dir of its own")
    created = _ensure(state)
    wrote_agent = False
    try:
        wrote_agent = boot.agent_unit(state)
        _build_uapi_cache()
        if args.foreground:
            return _foreground(state)
        return _daemon(state, args.timeout)
    except BaseException:
        _undo(state, created, wrote_agent)
        raise


def _undo(state, created: bool, wrote_agent: bool) -> None:
    """What a `luvmm boot` that did not start made goes: a state dir it
    created, else the agent's unit it wrote and the init's files."""
    import shutil

    from luvmm.liveupdate import boot

    if boot.running(state) is not None:
        return  # another init took the state dir meanwhile: all of it is that one's
    if created:
        shutil.rmtree(state.path, ignore_errors=True)
        return
    if wrote_agent:
        state.remove_unit("agent")
    boot.clean(state)


def _ready_line(line: str, state) -> tuple[int, str, list[str]]:
    """(pid, boot kind, units) of a ``ready`` line, or CliError with what the init said."""
    if line.startswith("error "):
        raise CliError(line[6:])
    parts = line.split(" ")
    if len(parts) != 4 or parts[0] != "ready":
        raise CliError(f"luvmm's init said {line[:200]!r} (see {os.path.join(state.path, 'boot.log')})")
    return int(parts[1]), parts[2], [u for u in parts[3].split(",") if u]


def _say_ready(state, pid: int, kind: str, units: list[str]) -> None:
    print(f"luvmm's init running in {state.path} (pid {pid}, {kind} boot): started "
          f"{', '.join(units) or 'no unit'}; control socket {state.init_socket}", flush=True)


def _foreground(state) -> int:
    import logging

    from luvmm.liveupdate import boot

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    said = []

    def ready(line: str) -> None:
        said.append(line)
        if line.startswith("ready "):
            _say_ready(state, *_ready_line(line, state))

    status = boot.serve(state, ready=ready)
    if said and said[0].startswith("error "):
        raise CliError(said[0][6:])
    return exitcodes.OK if status == 0 else exitcodes.FAILED


def _daemon(state, timeout: float) -> int:
    from luvmm.liveupdate import boot

    log_path = os.path.join(state.path, boot.LOG)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:  # pragma: no cover -- runs in the daemon
        status = 1
        try:
            os.close(read_end)
            os.setsid()
            if os.fork():
                os._exit(0)  # the init is the session's second process: no terminal can become its own
            _detach(log_fd)
            status = _serve_daemon(state, write_end)
        except BaseException:
            import traceback

            traceback.print_exc()  # to boot.log
        finally:
            os._exit(status)
    os.close(write_end)
    os.close(log_fd)
    os.waitpid(child, 0)
    try:
        line = _read_line(read_end, timeout)
    except KeyboardInterrupt:
        line = None
        _kill(state)  # Ctrl-C: as if it had never been started
        raise
    finally:
        os.close(read_end)
    if line is None or line == "":
        _kill(state)  # it did not say it is ready in time: stop it and its units
        why = "did not start" + (f" within {timeout:g} s" if line is None else "")
        raise CliError(f"luvmm's init {why} (see {log_path}{_last_line(log_path)})")
    pid, kind, units = _ready_line(line, state)
    from luvmm.services import InitClient

    client = InitClient(state.init_socket, timeout=timeout)
    try:
        client.call({"op": "hello"})
    except OSError as e:
        _kill(state)
        raise CliError(f"luvmm's init (pid {pid}) does not answer on {state.init_socket}: {e.strerror}") from None
    finally:
        client.close()
    _say_ready(state, pid, kind, units)
    return exitcodes.OK


def _kill(state) -> None:
    import signal

    from luvmm.liveupdate import boot

    pid = boot.running(state)
    if pid is not None and pid > 0:
        os.kill(pid, signal.SIGTERM)
        _wait_exit(pid, 10)


def _detach(log_fd: int) -> None:  # pragma: no cover -- runs in the daemon
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    os.chdir("/")
    os.umask(0o022)
    sys.stdin = open(os.devnull)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)


def _serve_daemon(state, write_end: int) -> int:  # pragma: no cover -- runs in the daemon
    import logging

    from luvmm.liveupdate import boot

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)

    def ready(line: str) -> None:
        try:
            os.write(write_end, f"{line}\n".encode())
            os.close(write_end)
        except OSError:
            pass  # the `luvmm boot` that started us gave up waiting

    return boot.serve(state, ready=ready)


def _read_line(fd: int, timeout: float) -> str | None:
    """The first line on ``fd``: None if none came within ``timeout``, "" if it closed first."""
    import time

    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return ""
        data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace")


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            lines = [ln.strip() for ln in f.read()[-4000:].decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return f": {lines[-1][:300]}" if lines else ""


def _wait_exit(pid: int, timeout: float) -> bool:
    """Whether ``pid`` exited within ``timeout`` seconds."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def _stop(state, timeout: float) -> int:
    import signal

    from luvmm.liveupdate import boot

    pid = boot.running(state) if os.path.isdir(state.path) else None
    if pid is None:
        if os.path.isdir(state.path):
            boot.clean(state)  # what an init that died left
        say(f"luvmm boot: no luvmm init is running in {state.path}")
        return exitcodes.OK  # already stopped: what was asked holds (as `luvmm host stop`)
    if pid < 0:
        raise CliError(f"luvmm's init in {state.path} is starting: try again")
    os.kill(pid, signal.SIGTERM)
    if not _wait_exit(pid, timeout):
        raise CliError(f"luvmm's init (pid {pid}) did not stop within {timeout:g} s")
    print(f"stopped luvmm's init in {state.path} (pid {pid}) and its units")
    return exitcodes.OK


def add_parser(sub) -> None:
    p = sub.add_parser(
        "boot", help="a real host without systemd: start luvmm's init (the agent, every VM's VMM)",
        description="Start luvmm's own init over the real kernel, as luvmm's systemd units would on a host "
                    "with systemd: it writes the agent's unit if there is none, starts every unit of the state "
                    "dir (the agent, each VM's VMM), restarts them when they fail, keeps their fd stores, and "
                    "answers on init.sock (in the runtime dir: $LUVMM_RUNTIME_DIR, default /run/luvmm). The first `luvmm boot` since the kernel booted starts them as "
                    "after a kexec (a VM restores from the sessions the old kernel handed over, or boots cold "
                    "if there are none); one again in the same boot starts them cold. It daemonizes (log in "
                    "DIR/boot.log) and returns once the init answers; one init per state dir.")
    p.add_argument("--host", metavar="real", default="real",
                   help="the host it runs on: only real (the running kernel, the default whatever $LUVMM_HOST "
                        "says) is meaningful here")
    p.add_argument("--state-dir", metavar="DIR",
                   help=f"the state dir (default: $LUVMM_STATE_DIR, else {DEFAULT_STATE_DIR})")
    p.add_argument("--foreground", action="store_true",
                   help="run the init in the foreground (its log on stderr) until SIGTERM or SIGINT, for an rc "
                        "script or an inittab line")
    p.add_argument("--timeout", type=positive_seconds, default=30.0, metavar="S",
                   help="how long to wait for the init to answer, or with --stop to exit (default 30)")
    guest_cpus_arg(p)
    p.add_argument("--stop", action="store_true",
                   help="stop the init running in the state dir and its units (SIGTERM, then wait)")
    p.set_defaults(func=_cmd_boot)
