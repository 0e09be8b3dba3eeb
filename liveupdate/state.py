"""The state dir: the emulated host's "disk".

Layout: ``host.sock`` (the daemon's control socket, mode 0600), ``agent.sock``, ``notify.sock`` (init's sd_notify socket),
``host.pid``, ``host.log``, ``host.lock`` (held by the daemon for its life:
one host per state dir); on a real host under `luvmm boot` instead of the
daemon's: ``init.sock``, ``boot.pid``, ``boot.log`` and ``boot.id`` (the
kernel's boot it last started in); ``units/NAME.json`` (what init starts), ``logs/``
(each unit's output), ``vms/NAME/`` (per-VM files of the VMM), ``.luvmm-state``
(whether luvmm created the directory).  A directory luvmm creates is 0700:
only its owner reaches the host; one the user points at is used as it is,
unless others may write into it.  A stopped host leaves only its VMs'
definitions behind (:meth:`StateDir.clean`).

Why this long: it is the one description of the state dir and of how a unit
starts (python_unit, the guest CPUs, the bytecode written whole), which every
process of a host reads -- on the restore path too, so it imports nothing of
luvmm's above it.
"""

from __future__ import annotations

import os

from luvmm.names import VM_NAME_CHARS as _NAME_CHARS, VM_NAME_MAX, check_vm_name  # noqa: F401 - re-exported

#: systemd's UNIT_NAME_MAX (256 with the NUL); its characters, less the
#: backslash of its escapes (a file name here).
UNIT_NAME_MAX = 255
_UNIT_CHARS = _NAME_CHARS | frozenset(":@")


def check_unit_name(name) -> str:
    """A unit name init can run (``agent``, ``vm-NAME``, a test's own): what
    a systemd unit name holds, and a safe file name (``units/NAME.json``)."""
    if not isinstance(name, str) or not 1 <= len(name.encode()) <= UNIT_NAME_MAX \
            or set(name) - _UNIT_CHARS or name[0] in ".-":
        raise ValueError(f"bad unit name {str(name)[:80]!r}: 1-{UNIT_NAME_MAX} letters, digits and ':-_.@', "
                         "starting with a letter or digit")
    if name.startswith("vm-"):
        check_vm_name(name[3:])  # a VM's unit
    return name


def _valid_unit(name: str) -> bool:
    try:
        check_unit_name(name)
    except ValueError:
        return False
    return True


#: Run first in every unit (python_unit): the bytecode cache it writes (in
#: the state dir, PYTHONPYCACHEPREFIX) is written whole or not at all.
#: CPython's own writer (importlib._bootstrap_external._write_atomic, 3.11)
#: ignores a short write: on a full disk it renames a truncated .pyc into
#: place, and every later import of that module fails ("EOFError: marshal
#: data too short") -- a VMM restarted for ever.  This one writes until all
#: of it is written or the write fails (ENOSPC); a failure leaves no file,
#: and the import goes on from the source (SourceFileLoader.set_data does
#: not cache what it cannot write).
SAFE_BYTECODE = """\
import _frozen_importlib_external as _b
def _write_whole(path, data, mode=0o666, _os=_b._os):
    tmp = f"{path}.{id(path)}"
    fd = _os.open(tmp, _os.O_EXCL | _os.O_CREAT | _os.O_WRONLY, mode & 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[_os.write(fd, view):]
        _os.close(fd)
        fd = -1
        _os.replace(tmp, path)
    except OSError:
        if fd >= 0:
            _os.close(fd)
        try:
            _os.unlink(tmp)
        except OSError:
            pass
        raise
_b._write_atomic = _write_whole
"""


def python_unit(module: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment for a unit that runs ``module.main(args)``.

    Units run with ``-S`` (no site initialisation: about 60 ms less before a
    restored VMM runs its guest again) and get this interpreter's import path
    appended after the standard library's (PYTHONPATH would put it first and
    make every standard-library import search it).  The unit starts with
    the cyclic garbage collector off: its restore path allocates a few
    hundred thousand objects (imports, mostly) and no garbage worth a
    collection, which would take a millisecond of the blackout; the unit's
    main turns it on once its restore path is done.  The bytecode it
    caches is written whole or not at all (:data:`SAFE_BYTECODE`).
    """
    import site
    import sys

    import luvmm

    # Where ``luvmm`` is: the checkout, or the site-packages it is installed in.
    paths = [os.path.dirname(os.path.dirname(os.path.abspath(luvmm.__file__)))]
    paths += [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    # Not runpy: calling main() directly spares its imports on the restore path.
    boot = (f"import gc; gc.disable(); exec({SAFE_BYTECODE!r}); import sys; sys.path += {paths!r}; "
            f"sys.argv[0] = {module!r}; "
            f"from {module} import main; sys.exit(main({list(args)!r}))")
    return [sys.executable, "-S", "-c", boot], {}


#: luvmm's units (the agent, the VMMs) are restarted whenever they fail, never
#: given up on, after a delay that grows to this while they keep failing.
RESTART_MAX_DELAY_S = 2.0

PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h
SIGKILL = 9


def die_with_init() -> None:
    """A unit's process does not outlive the init that started it (the
    emulated host's daemon: the machine): PR_SET_PDEATHSIG, asked for by
    init through ``LUVMM_INIT_PID``.  Set in the process itself -- one
    prctl -- rather than through a wrapper exec on the restore path; if
    init already died before it was set, exit now."""
    init = os.environ.get("LUVMM_INIT_PID")
    if not init:
        return
    from luvmm.abi import libc

    libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
    if libc.getppid() != int(init):
        os._exit(SIGKILL + 128)  # the machine is gone already


def unit_boot() -> str:
    """How this unit was started: ``cold``, ``kexec`` (look for what the
    previous kernel handed over) or ``restart`` (init started it again after
    its process died).

    The emulated host's init says so in ``LUVMM_BOOT``.  systemd says nothing
    of the kind (luvmm/wiring/systemd.py): there, ``restart`` when this unit's fd
    store was passed to it (LISTEN_FDS for this pid, its sockets apart -- they
    are passed at every start: the VMM takes them out first, see
    luvmm.vmm.process; systemd passes the store at a restart) or when it already ran in this boot (its marker
    ``$RUNTIME_DIRECTORY/UNIT.started``, made here: /run is a tmpfs that no
    boot inherits); else, its first start since the kernel booted, ``kexec``
    -- the VMM finds no incoming session after a cold boot and boots its VM
    cold, and the agent resumes only an update its record says was in its
    kexec.  Not under an init that says either: ``cold``.  One open() at
    most: the restore path calls it."""
    boot = os.environ.get("LUVMM_BOOT")
    if boot:
        return boot
    runtime, unit = os.environ.get("RUNTIME_DIRECTORY"), os.environ.get("LUVMM_UNIT")
    if not runtime or not unit or "/" in unit:
        return "cold"
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS", "0") != "0":
        return "restart"
    marker = os.path.join(runtime.split(":")[0], f"{unit}.started")
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        return "restart"
    except OSError:
        return "cold"  # no marker can be kept: nothing tells a restart from a kexec
    return "kexec"


def record_imports(point: str) -> None:
    """With ``LUVMM_RECORD_IMPORTS=DIR``: write the modules this process has
    imported by now to DIR/POINT.PID -- how tests/e2e/test_restore_path.py pins
    what the restore path imports before the guest runs again (each module
    is milliseconds of blackout)."""
    where = os.environ.get("LUVMM_RECORD_IMPORTS")
    if where:
        import sys

        with open(os.path.join(where, f"{point}.{os.getpid()}"), "w") as f:
            f.write("\n".join(sorted(sys.modules)) + "\n")


#: The CPUs the guests' vCPUs run on, which luvmm's own work keeps off
#: ("0,2-3"; unset: no CPU is set apart).  The emulated host sets it for its
#: units from `luvmm host start --guest-cpus`; on a real host, the units'
#: environment (`luvmm host install --guest-cpus`).
GUEST_CPUS_ENV = "LUVMM_GUEST_CPUS"


def parse_cpu_list(text: str) -> frozenset[int]:
    """A CPU list as the kernel writes them (cpuset.cpus, isolcpus=):
    "0,2-3" -> {0, 2, 3}; ValueError for anything else."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad CPU list {text!r}: want numbers and ranges, as in 0,2-3")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first or last >= 4096:
            raise ValueError(f"bad CPU range {part!r} in {text!r}")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def guest_cpus() -> frozenset[int]:
    """The CPUs set apart for vCPUs (GUEST_CPUS_ENV), those of them this
    process may use; empty where none are."""
    text = os.environ.get(GUEST_CPUS_ENV, "").strip()
    if not text:
        return frozenset()
    try:
        return parse_cpu_list(text) & frozenset(range(os.cpu_count() or 1))
    except ValueError:
        return frozenset()


def _set_affinity(cpus) -> None:
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:
        pass  # outside this process's cpuset: the scheduler's choice stands


def use_every_cpu() -> None:
    """The restore path: while the vCPUs are not running, every CPU is
    theirs to rebuild the VM on -- including the guest CPUs the process that
    started this one (the emulated host's daemon) keeps off."""
    if os.environ.get(GUEST_CPUS_ENV):
        _set_affinity(range(os.cpu_count() or 1))


PR_SET_NAME = 15  # include/uapi/linux/prctl.h


def pin_vcpu(index: int) -> None:
    """A vCPU thread: named ``vcpuN`` (what `top -H` and /proc show, as
    QEMU's "CPU N/KVM"), and onto the guest CPUs where they are set apart."""
    from luvmm.abi import ffi, libc

    name = ffi.new("char[]", f"vcpu{index}".encode())  # kept alive across the call
    libc.prctl(PR_SET_NAME, ffi.cast("unsigned long", ffi.cast("uintptr_t", name)), 0, 0, 0)
    cpus = guest_cpus()
    if cpus:
        _set_affinity(cpus)


def keep_off_guest_cpus() -> None:
    """This thread, and those it starts from now on, off the guest CPUs
    (if any other CPU is left)."""
    cpus = guest_cpus()
    if cpus:
        rest = frozenset(range(os.cpu_count() or 1)) - cpus
        if rest:
            _set_affinity(rest)


def guests_first() -> None:
    """Once the guests run again: the calling thread -- and the threads it
    starts from now on -- keeps off the CPUs set apart for the vCPUs
    (GUEST_CPUS_ENV), where any are.  What the VMM and the agent still have
    to do (their control planes' imports, a Prometheus scrape, a status
    request) competes with the guest for the CPU, not for a lock: the vCPUs
    run in C.  Not before the resume: during the blackout the restore is
    the guest's path, and every CPU is its.  Not by a lower priority
    either: the same threads prepare the next update (pause, save, the
    agent's freeze), which is the next blackout's path."""
    keep_off_guest_cpus()


UNIT_USAGE = "usage: ... --state-dir DIR [--name NAME] [--host emulated|real]"


def parse_unit_args(argv: list[str], *, name_required: bool = True) -> dict[str, str]:
    """The few flags of the agent and the VMM, without argparse (20 ms on the restore path)."""
    args = {"host": "emulated"}
    it = iter(argv)
    for flag in it:
        key = {"--state-dir": "state_dir", "--name": "name", "--host": "host"}.get(flag)
        value = next(it, None)
        if key is None or value is None:
            raise SystemExit(UNIT_USAGE)
        args[key] = value
    if "state_dir" not in args or (name_required and "name" not in args) or \
            args["host"] not in ("emulated", "real"):
        raise SystemExit(UNIT_USAGE)
    return args


def default_state_dir() -> str:
    """$LUVMM_STATE_DIR, else $XDG_RUNTIME_DIR/luvmm, else /tmp/luvmm-UID."""
    if os.environ.get("LUVMM_STATE_DIR"):
        return os.environ["LUVMM_STATE_DIR"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "luvmm")
    return f"/tmp/luvmm-{os.getuid()}"


class StateError(RuntimeError):
    """A state dir that cannot be used (not a directory, read-only, not safe)."""


#: Marks a directory as a luvmm state dir, and says whether luvmm created it
#: (removed when the host stops and nothing is left in it) or found it.
MARKER = ".luvmm-state"
#: The state's own directories and files (check_safe refuses a symlink in their place).
STATE_DIRS = ("units", "logs", "vms", "agent", "pycache")
STATE_FILES = (MARKER, "host.lock", "host.log", "host.pid", "host.sock", "host.json", "agent.sock", "notify.sock",
               "agent/update.json",
               "init.sock", "boot.pid", "boot.log", "boot.id")


def lock_file(path: str, mode: int = 0o600) -> int | None:
    """The file at ``path`` (created if need be, never through a symlink),
    open and locked for this process alone (flock, exclusive): its fd; None
    if another process holds it.  The lock goes with the last fd of that open
    file (across fork and exec too): a process holds it for its life by
    keeping the fd.  The file locked may be one its last holder just
    unlinked (as it cleans up): only the one at the path counts."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            st, mine = os.stat(path, follow_symlinks=False), os.fstat(fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def lock_held(path: str) -> bool:
    """Whether some process holds a lock on the file at ``path``.  Read from
    /proc/locks, not by trying the lock: a try would hold it for a moment,
    and a process taking it then would think it taken."""
    try:
        st = os.stat(path, follow_symlinks=False)
        with open("/proc/locks") as f:
            table = f.read()
    except OSError:
        return False
    # "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF" (fs/locks.c, lock_get_status)
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any(len(fields) > 5 and fields[5] == where for fields in map(str.split, table.splitlines()))


def runtime_dir() -> str | None:
    """Where a real host's sockets go: ``$LUVMM_RUNTIME_DIR`` (luvmm's
    real-host commands default it to /run/luvmm), else systemd's
    ``$RUNTIME_DIRECTORY`` (a luvmm unit's RuntimeDirectory=: /run/luvmm).
    None: in the state dir."""
    found = os.environ.get("LUVMM_RUNTIME_DIR") or os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return os.path.abspath(found) if found else None


class StateDir:
    """A host's state: on disk, where it outlives a kexec (units, the VMs'
    definitions, the agent's update record), and its sockets -- in
    ``runtime`` (a tmpfs such as /run/luvmm: a socket is a thing of one
    boot, and a state dir on a network or 9p file system may not take one),
    or beside the state when there is none."""

    def __init__(self, path: str, runtime: str | None = None):
        self.path = os.path.abspath(path)
        self.runtime = os.path.abspath(runtime) if runtime else self.path

    @classmethod
    def of_host(cls, path: str, kind: str) -> "StateDir":
        """A ``kind`` ("real" or "emulated") host's state dir: a real host's
        sockets in :func:`runtime_dir`; the emulated host keeps its own beside its state."""
        return cls(path, runtime_dir() if kind == "real" else None)

    def runtime_path(self, *parts: str) -> str:
        """A socket's path in the runtime dir, its directories made (0700) if missing."""
        path = os.path.join(self.runtime, *parts)
        if self.runtime != self.path:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        return path

    @property
    def socket(self) -> str:
        return os.path.join(self.runtime, "host.sock")

    @property
    def agent_socket(self) -> str:
        return os.path.join(self.runtime, "agent.sock")

    def vmm_socket(self, name: str) -> str:
        """The VMM of ``name``'s control socket (``status``, ``stop``)."""
        return os.path.join(self.runtime, "vms", check_vm_name(name), "vmm.sock")

    @property
    def init_socket(self) -> str:
        """`luvmm boot`'s control socket (luvmm.liveupdate.boot)."""
        return os.path.join(self.runtime, "init.sock")

    @property
    def pidfile(self) -> str:
        return os.path.join(self.path, "host.pid")

    @property
    def host_lock(self) -> str:
        """Held (flock) by the emulated host's daemon for its life, and by
        whoever starts one or cleans up after one: one host per state dir."""
        return os.path.join(self.path, "host.lock")

    @property
    def log(self) -> str:
        return os.path.join(self.path, "host.log")

    # pathlib only where it is used: the restore path must not import it.
    @property
    def units(self):
        from pathlib import Path

        return Path(self.path) / "units"

    @property
    def logs(self):
        from pathlib import Path

        return Path(self.path) / "logs"

    def vm_dir(self, name: str):
        from pathlib import Path

        return Path(self.path) / "vms" / check_vm_name(name)

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def ensure(self) -> None:
        """Make the state dir usable, or StateError saying why not.

        A directory luvmm creates is 0700 (only its owner reaches the host),
        made with one exclusive mkdir.  One the user pointed at is used as it
        is, never chmod'ed behind their back.  Refused: a state dir that is
        not the user's, or that others may write into, or under a parent
        that others may write into (without the sticky bit, as /tmp has) --
        whoever can write there can plant a unit the host would run, or swap
        the directory itself; and any of the state's own files or
        directories that is a symlink (they are never followed)."""
        created = raced = False
        try:
            try:
                st = os.lstat(self.path)
            except FileNotFoundError:
                self._check_parents()
                try:
                    os.mkdir(self.path, 0o700)  # exclusive: if someone made it meanwhile, this fails
                    created = True
                except FileExistsError:
                    # Made meanwhile -- by another luvmm command starting a host
                    # here at the same moment (the host lock settles which one
                    # runs): used as found, after the same checks.
                    raced = True
                st = os.lstat(self.path)
            self.check_safe(st)
            if created:
                self.write_file(MARKER, b"created\n", mode=0o644)
            elif not raced:
                # Found, not made: said so unless it says already.  Exclusively:
                # a luvmm command that made it a moment ago writes "created"
                # over this, never the other way round.
                try:
                    fd = os.open(os.path.join(self.path, MARKER),
                                 os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                except FileExistsError:
                    pass
                else:
                    try:
                        os.write(fd, b"existing\n")
                    finally:
                        os.close(fd)
            for sub in ("units", "logs"):
                self.make_dir(sub)
        except OSError as e:
            raise StateError(f"cannot use {self.path} as a state dir: {e.strerror or e}") from None

    def check_safe(self, st=None) -> None:
        """StateError unless the state dir is a directory of this user's that
        nobody else may write into (nor into its parents), and none of the
        state's entries is a symlink.  Changes nothing."""
        import stat

        st = st or os.lstat(self.path)
        if stat.S_ISLNK(st.st_mode):
            raise StateError(f"{self.path} is a symlink: give the directory itself")
        if not stat.S_ISDIR(st.st_mode):
            raise StateError(f"{self.path} is not a directory")
        if st.st_uid != os.geteuid():
            raise StateError(f"{self.path} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}): "
                             "a host there would run what its owner puts in it")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise StateError(f"{self.path} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}): "
                             "use a directory only you can write to (chmod go-w, or another --state-dir)")
        self._check_parents()
        for rel in STATE_DIRS:
            self._check_entry(rel, directory=True)
        for rel in STATE_FILES:
            self._check_entry(rel, directory=False)
        vms = os.path.join(self.path, "vms")
        if os.path.isdir(vms) and not os.path.islink(vms):
            for name in os.listdir(vms):
                self._check_entry(f"vms/{name}", directory=True)
                for leaf in ("config.json", "metrics.json"):
                    self._check_entry(f"vms/{name}/{leaf}", directory=False)

    def _check_parents(self) -> None:
        import stat

        path = os.path.dirname(self.path)
        while True:
            st = os.stat(path)
            if st.st_uid not in (0, os.geteuid()) or (st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
                                                       and not st.st_mode & stat.S_ISVTX):
                raise StateError(f"{path}, above the state dir {self.path}, may be changed by other users "
                                 f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}): they could swap "
                                 "the state dir; use a directory under one only you (or root) can change")
            if path == "/":
                return
            path = os.path.dirname(path)

    def _check_entry(self, rel: str, *, directory: bool) -> None:
        import stat

        path = os.path.join(self.path, rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise StateError(f"{path} is a symlink: refusing it (the state dir's files are never followed)")
        if directory and not stat.S_ISDIR(st.st_mode):
            raise StateError(f"{path} is not a directory")
        if not directory and not (stat.S_ISREG(st.st_mode) or stat.S_ISSOCK(st.st_mode)):
            raise StateError(f"{path} is not a regular file")

    def make_dir(self, rel: str, mode: int = 0o700) -> str:
        """``rel`` inside the state dir, made if missing; StateError if it is a symlink or not a directory."""
        path = os.path.join(self.path, rel)
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            self._check_entry(rel, directory=True)
        return path

    def write_file(self, rel: str, data: bytes, mode: int = 0o600) -> None:
        """Write ``rel`` (in a directory of the state dir) whole or not at
        all: a new file beside it, renamed over it.  A symlink in its place
        is refused, not followed."""
        path = os.path.join(self.path, rel)
        if os.path.dirname(rel):
            self._check_entry(os.path.dirname(rel), directory=True)
        self._check_entry(rel, directory=False)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, path)

    def read_file(self, rel: str) -> bytes:
        """``rel``, never through a symlink (ELOOP)."""
        fd = os.open(os.path.join(self.path, rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            return os.read(fd, max(os.fstat(fd).st_size, 1) + 4096)
        finally:
            os.close(fd)

    def created_by_luvmm(self) -> bool:
        try:
            with open(os.path.join(self.path, MARKER)) as f:
                return f.read().strip() == "created"
        except OSError:
            return False

    def clean(self, keep_logs=()) -> list[str]:
        """What a stopped host leaves: the VMs' definitions (units/vm-*.json
        and vms/NAME/: config, metrics) and, while there are any, the logs.
        Everything else the host made goes -- but ``keep_logs``, logs an
        error pointed the user to --; so does the directory itself if
        luvmm created it and nothing is left.  Returns the VMs kept.  Only
        with :attr:`host_lock` held (luvmm.liveupdate.emu.hostctl.clean): a host
        started here meanwhile keeps its files."""
        import shutil

        vms = self.vm_names()
        for name in ("host.sock", "agent.sock", "notify.sock", "host.pid", "host.lock", "units/agent.json",
                     "units/agent.tmp"):
            try:
                os.unlink(os.path.join(self.path, name))
            except (FileNotFoundError, NotADirectoryError):
                pass
        for name in ("pycache", "agent"):
            shutil.rmtree(os.path.join(self.path, name), ignore_errors=True)
        if vms:
            for name in vms:  # a VMM's socket does not outlive it
                try:
                    os.unlink(os.path.join(self.path, "vms", name, "vmm.sock"))
                except FileNotFoundError:
                    pass
            return vms
        created = self.created_by_luvmm()
        kept = {os.path.realpath(p) for p in keep_logs}
        for name in ("units", "logs", "vms"):
            if name == "logs" and kept:  # an error pointed there: that log stays, nothing else
                for entry in self.logs.iterdir() if self.logs.is_dir() else ():
                    if os.path.realpath(entry) not in kept:
                        entry.unlink(missing_ok=True)
                continue
            shutil.rmtree(os.path.join(self.path, name), ignore_errors=True)
        for name in ("host.log", "host.json", MARKER):
            try:
                os.unlink(os.path.join(self.path, name))
            except FileNotFoundError:
                pass
        if created:
            try:
                os.rmdir(self.path)
            except OSError:
                # Something is in it: the user's, or what a luvmm command starting
                # here this very moment made.  It stays luvmm's, marked so: the
                # clean-up after that command removes it (an unmarked one is left
                # as the user's, empty, for ever).
                try:
                    self.write_file(MARKER, b"created\n", mode=0o644)
                except OSError:
                    pass
        return []

    def write_pid(self, pid: int) -> None:
        self.write_file("host.pid", f"{pid}\n".encode(), mode=0o644)

    def clear_pid(self) -> None:
        try:
            os.unlink(self.pidfile)
        except FileNotFoundError:
            pass

    def pid(self) -> int | None:
        try:
            return int(self.read_file("host.pid"))
        except (OSError, ValueError):
            return None

    # --- units ----------------------------------------------------------------------------

    def write_unit(self, name: str, argv: list[str], env: dict[str, str] | None = None, **extra):
        check_unit_name(name)
        self.ensure()
        import json

        self.write_file(f"units/{name}.json", json.dumps({"name": name, "argv": argv, "env": env or {}, **extra},
                                                         indent=2).encode())
        return self.units / f"{name}.json"

    def remove_unit(self, name: str) -> bool:
        check_unit_name(name)
        try:
            (self.units / f"{name}.json").unlink()
            return True
        except FileNotFoundError:
            return False

    def vm_names(self) -> list[str]:
        """The VMs defined here (units ``vm-NAME``: what init boots), running or not."""
        return [u["name"][3:] for u in self.read_units() if u["name"].startswith("vm-")]

    def read_units(self) -> list[dict]:
        import json

        units = []
        if not self.units.is_dir() or self.units.is_symlink():
            return units
        for path in sorted(self.units.glob("*.json")):
            try:
                unit = json.loads(self.read_file(f"units/{path.name}"))  # not through a symlink
            except (OSError, ValueError):
                continue
            if isinstance(unit, dict) and isinstance(unit.get("argv"), list) and unit.get("name") == path.stem \
                    and _valid_unit(path.stem):
                units.append(unit)
        return units
