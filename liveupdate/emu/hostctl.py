"""Starting, finding and stopping an emulated host (what `luvmm host` does)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys

from luvmm.liveupdate.state import (
    GUEST_CPUS_ENV,
    RESTART_MAX_DELAY_S,
    StateDir,
    default_state_dir,
    lock_file,
    lock_held,
    parse_cpu_list,
    python_unit,
)


class HostError(RuntimeError):
    pass


class HostBusy(HostError):
    """Another process holds the state dir's host lock: its host runs, or is starting."""


#: How long a command that finds a host starting waits for it to serve, and
#: one that stopped a host waits for the lock to clean up after it.
LOCK_WAIT_S = 30.0


def dead(state: StateDir) -> int | None:
    """The pid of a daemon that ran here and died (its pid file or socket
    left behind, nothing answering), else None."""
    if not state.exists() or running(state) or lock_held(state.host_lock):
        return None  # answering, or starting, or stopping: the daemon holds its lock for its life
    pid = state.pid()
    if pid is not None and _is_daemon(pid, state):
        return None  # alive, not answering (yet): not dead
    if pid is not None or os.path.exists(state.socket):
        return pid or -1
    return None


def orphans(state: StateDir) -> list[int]:
    """Processes of a dead host's machine: its daemon, and its units and
    what they started (init gave them ``LUVMM_UNIT`` and this state dir in
    their environment).  Nothing else -- not a shell that merely has
    LUVMM_STATE_DIR set."""
    needle = f"LUVMM_STATE_DIR={state.path}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if needle in env and any(v.startswith(b"LUVMM_UNIT=") for v in env) or _is_daemon(int(entry), state):
            found.append(int(entry))
    return found


def bury(state: StateDir) -> list[int]:
    """After a daemon died: stop what is left of its machine (SIGKILL) and
    its stale files.  Returns the pids stopped."""
    import signal

    pids = orphans(state)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    clean(state)
    return pids


def clean(state: StateDir, wait: float = LOCK_WAIT_S, keep_logs: tuple[str, ...] = ()) -> list[str] | None:
    """:meth:`StateDir.clean` under the host lock, once the daemon that held
    it is gone (waiting up to ``wait`` for it to let go); None, cleaning
    nothing, if a host holds it still -- one started here meanwhile: what is
    there is its.  The lock file goes with the rest, still locked (the next
    taker checks it locked the file at the path)."""
    import time

    deadline = time.monotonic() + wait
    while True:
        try:
            fd = lock_file(state.host_lock)
        except FileNotFoundError:
            return state.vm_names() if state.exists() else []  # the directory itself is gone
        if fd is not None:
            break
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)  # polling a lock its holder is letting go of (a daemon exiting)
    try:
        return state.clean(keep_logs)
    finally:
        os.close(fd)


def running(state: StateDir) -> bool:
    """Whether a daemon answers on the state dir's control socket (changes nothing)."""
    if not os.path.exists(state.socket):
        return False
    from luvmm.liveupdate.emu.client import HostGone, connect

    try:
        connect(state.socket).close_connection()
    except (HostGone, OSError):
        return False
    return True


def start(state: StateDir, *, devices: int = 1, profile: str = "continuous-dma",
          dsa_bandwidth: float | None = None, agent: bool = True, timeout: float = 30.0,
          env: dict | None = None, metrics_port: str | int | None = None, guest_cpus: str | None = None) -> int:
    """Start a daemon in the background; returns its pid once it serves.
    A daemon that cannot start leaves the state dir as it found it.
    ``guest_cpus``: the CPUs set apart for the guests' vCPUs ("0,2-3"),
    which the daemon -- the machine and its kernel, emulated in Python --
    and luvmm's own work keep off (luvmm.liveupdate.state.guests_first)."""
    if guest_cpus:
        parse_cpu_list(guest_cpus)  # ValueError: the caller's mistake, before anything starts
        env = dict(env or {}, **{GUEST_CPUS_ENV: guest_cpus})
    if running(state):
        raise HostBusy(f"an emulated host is already running in {state.path}")
    state.ensure()  # StateError: not a directory, read-only, writable by others
    # One host per state dir, whoever else starts one at the same moment:
    # the lock first, before anything of a host is made; the daemon holds it
    # (the same open file) for its life.
    lock = lock_file(state.host_lock)
    if lock is None:
        raise HostBusy(f"an emulated host is already running (or starting) in {state.path}")
    try:
        if running(state):  # one that holds no lock (an older luvmm's)
            raise HostBusy(f"an emulated host is already running in {state.path}")
        state.write_file(OPTIONS_FILE, json.dumps({
            "devices": devices, "profile": profile, "dsa_bandwidth": dsa_bandwidth, "agent": agent,
            "metrics_port": metrics_port, "guest_cpus": guest_cpus}).encode())
        return _start(state, devices=devices, profile=profile, dsa_bandwidth=dsa_bandwidth, agent=agent,
                      timeout=timeout, env=env, metrics_port=metrics_port, lock=lock)
    except HostBusy:
        raise
    except BaseException:
        state.clean()  # the lock still held: nothing of another host's
        raise
    finally:
        os.close(lock)  # the daemon's copy holds it on


def _start(state: StateDir, *, devices, profile, dsa_bandwidth, agent, timeout, env, metrics_port, lock) -> int:
    from luvmm import abi

    if not abi.PREBUILT or not os.path.exists(abi._CACHE):
        # The restore path imports the parsed uAPI instead of parsing it.  The file itself, not
        # this process's import of it: an editable install can map the module to another checkout.
        from luvmm.uapi import build_cache

        build_cache()
    if agent:
        # Restarted when it dies, as luod would be (Restart=on-failure): the VMMs register again.
        state.write_unit("agent", *python_unit("luvmm.wiring.agent", "--state-dir", state.path), restart="on-failure",
                         pdeathsig="self", start_limit_burst=0,
                         restart_max_delay_sec=RESTART_MAX_DELAY_S)
    else:
        state.remove_unit("agent")  # --no-agent means none, whatever an earlier host left
    read_end, write_end = os.pipe()
    argv = [sys.executable, "-m", "luvmm.liveupdate.emu.daemon", "--state-dir", state.path, "--devices", str(devices),
            "--kernel-profile", profile, "--ready-fd", str(write_end), "--lock-fd", str(lock)]
    if dsa_bandwidth:
        argv += ["--dsa-bandwidth", str(dsa_bandwidth)]
    if metrics_port is not None:
        argv += ["--metrics-port", str(metrics_port)]
    log = os.open(state.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                pass_fds=(write_end, lock), start_new_session=True,
                                env=dict(os.environ, **(env or {})))
    finally:
        os.close(log)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], timeout)
        line = os.read(read_end, 4096) if ready else b""
    finally:
        os.close(read_end)
    if line.strip() != b"ready":
        proc.kill()
        proc.wait()
        if line.startswith(b"error "):  # the daemon said why (e.g. its metrics port is taken)
            raise HostError(line[6:].decode(errors="replace").strip())
        tail = ""
        try:
            with open(state.log, "rb") as f:
                tail = f.read()[-2000:].decode(errors="replace")
        except OSError:
            pass
        raise HostError(f"the emulated host did not start (see {state.log}):\n{tail}")
    return proc.pid


def stop(state: StateDir, timeout: float = 30.0, keep_logs: tuple[str, ...] = ()) -> list[str] | None:
    """Ask the daemon to stop, wait for its process to exit, and clean the
    state dir up (:meth:`StateDir.clean`).  Returns the VMs whose definitions
    stay (init boots them when a host starts there again), or None if no host
    was running.  ``keep_logs``: logs (paths) an error pointed the user to,
    kept whatever else goes."""
    if not state.exists():
        return None
    pid = state.pid()
    if not running(state):
        if pid is not None and _is_daemon(pid, state):
            # A daemon that no longer answers: SIGTERM makes it stop its units and exit.
            import signal

            os.kill(pid, signal.SIGTERM)
            _wait_exit(pid, timeout)
            return clean(state, keep_logs=keep_logs) or []
        return None
    from luvmm.liveupdate.emu.client import connect

    host = connect(state.socket)
    try:
        host.call({"op": "stop"})
    finally:
        host.close_connection()
    if pid is not None:
        _wait_exit(pid, timeout)
    return clean(state, timeout, keep_logs) or []


def _is_daemon(pid: int, state: StateDir) -> bool:
    """Whether ``pid`` is still this state dir's daemon (not a reused pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"luvmm.liveupdate.emu.daemon" in argv and state.path.encode() in argv


def _wait_exit(pid: int, timeout: float) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        if not ready:
            raise HostError(f"the emulated host (pid {pid}) did not exit within {timeout:.0f} s")
    finally:
        os.close(pidfd)


def find(state_dir: str | None) -> StateDir:
    """The running host of ``state_dir`` (default: the embedded one's), or
    HostError.  Looks only: a command that reads or acts on a host never
    starts one (and never creates a state dir)."""
    state = StateDir(state_dir or default_state_dir())
    if state.exists():
        state.check_safe()  # not a host someone else set up for us to talk to
    if not running(state):
        gone = dead(state)
        if gone is not None:
            raise HostError(died(state, gone))
        raise HostError(f"no emulated host is running in {state.path} (`luvmm host start` starts one; "
                        "so does `luvmm vm start`)")
    return state


def died(state: StateDir, pid: int) -> str:
    return (f"the emulated host in {state.path} died{f' (pid {pid})' if pid > 0 else ''}: its machine and "
            f"its VMs' RAM are gone. `luvmm host start --state-dir {state.path}` starts a new one there "
            "(its VMs boot cold)")


#: The options a host was started with (state dir), kept with its VMs'
#: definitions: a host started there again without options has the same
#: devices, metrics port... (its VMs boot on it as they ran).
OPTIONS_FILE = "host.json"
#: What OPTIONS_FILE keeps: start()'s keyword arguments, by their names.
SAVED_OPTIONS = ("devices", "profile", "dsa_bandwidth", "agent", "metrics_port", "guest_cpus")
#: The DSAs of a host `luvmm vm start` starts: room for a few VMs.
AUTO_DEVICES = 4


def saved_options(state: StateDir) -> dict:
    """The options of the host that ran in ``state`` last (hostctl.start's
    keyword arguments), {} if none were kept."""
    try:
        saved = json.loads(state.read_file(OPTIONS_FILE))
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict):
        return {}
    return {name: saved[name] for name in SAVED_OPTIONS if name in saved}


def ensure(state_dir: str | None, *, say=print, **start_args) -> tuple[StateDir, bool]:
    """The host of ``state_dir`` (default: the embedded one), started if needed
    (and said so): what `luvmm vm start` does -- with the options of the host
    that ran there last, if it kept its VMs, else AUTO_DEVICES DSAs and
    ``start_args``.  Also whether this call started it (not another command
    starting it at the same moment)."""
    state = StateDir(state_dir or default_state_dir())
    if running(state):
        return state, False
    gone = dead(state)
    if gone is not None:  # a new machine over a dead one's state is an explicit act
        raise HostError(died(state, gone))
    start_args = {"devices": AUTO_DEVICES, **start_args, **saved_options(state)}
    try:
        start(state, **start_args)
    except HostBusy:
        _wait_serving(state, LOCK_WAIT_S)  # another command is starting it: that one will do
        return state, False
    say(f"started an emulated host in {state.path}")
    return state, True


def _wait_serving(state: StateDir, timeout: float) -> None:
    """Wait for the host another process is starting to serve (HostError if
    it does not, or gives up)."""
    import time

    deadline = time.monotonic() + timeout
    while not running(state):
        if not lock_held(state.host_lock):
            if running(state):
                return
            raise HostError(f"the emulated host another command was starting in {state.path} did not start")
        if time.monotonic() >= deadline:
            raise HostError(f"the emulated host starting in {state.path} did not serve within {timeout:.0f} s")
        time.sleep(0.02)  # polling its socket: it serves once it has said "ready" to its starter


def format_status(status: dict) -> str:
    """`luvmm host status` for people."""
    kernel = status["kernel"]
    lines = [f"emulated host pid {status['pid']} in {status['state_dir']}, up {status['uptime_s']:.0f} s",
             f"kernel profile {status['kernel_profile']}, generation {kernel['generation']}, "
             f"kexec count {status['kexec_count']}"]
    if status.get("panic"):
        lines.append(f"HALTED: kernel panic: {status['panic']}")
    if status.get("last_kho_error"):
        lines.append(f"last KHO image refused: {status['last_kho_error']}")
    if status.get("disk_error"):
        lines.append(f"disk: {status['disk_error']}")
    if status.get("faults"):
        lines.append(f"faults injected ({status.get('fault_hits', 0)} hits): {', '.join(status['faults'])}")
    lines.append("devices:")
    for d in kernel["vfio"]:
        flags = [name for name in ("bound", "preserved", "incoming", "enabled", "bus_master") if d.get(name)]
        lines.append(f"  {d['bdf']} {d['cdev']}  [{', '.join(flags) or 'idle'}]  descriptors {d['descriptors']}, "
                     f"bytes {d['bytes']}, faults {d['faults']}, errors {d['errors']}, "
                     f"interrupts {d['interrupts']} (+{d['interrupts_pending']} pending), "
                     f"MSI-X vectors {d['msix_vectors'] or '-'}")
    lines.append(f"open files: {len(kernel['open_files'])}" + (
        f" ({', '.join(sorted(set(kernel['open_files'])))})" if kernel["open_files"] else ""))
    lines.append("sessions:" + ("" if kernel["sessions"] else " none"))
    for s in kernel["sessions"]:
        files = ", ".join(f"{f['type']}#{f['token']:#x}{' (retrieved)' if f['retrieved'] else ''}"
                          for f in s["files"])
        lines.append(f"  {s['name']} ({s['direction']}{', retrieved' if s['retrieved'] else ''}): {files or '-'}")
    lines.append("units:" + ("" if status["units"] else " none"))
    for u in status["units"]:
        state = f"running, pid {u['pid']}" if u["running"] else (
            f"exited {u['returncode']}" if u["returncode"] is not None else "not started")
        lines.append(f"  {u['name']}: {state}, started {u['starts']} times")
    return "\n".join(lines)
