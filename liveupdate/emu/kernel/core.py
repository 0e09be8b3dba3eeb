"""The emulated kernel's core: files, device nodes, sysfs, boot and freeze."""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
from typing import Callable

from luvmm.abi import IoctlDef, ffi

log = logging.getLogger(__name__)


class KernelError(OSError):
    """A syscall failing with ``errno`` (and a message for the daemon's log)."""

    def __init__(self, err: int, message: str = ""):
        super().__init__(err, message or os.strerror(err))


class KernelPanic(Exception):
    """The kernel panicked at boot (the message is panic()'s): the machine halts."""


class File:
    """An open file description of the emulated kernel.

    The client holds one end of a socketpair (its fd); the daemon serves the
    other.  The file lives until every copy of the client end is closed --
    including copies the kernel itself holds, such as LUO's reference on a
    preserved file.
    """

    kind = "file"

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.sock: socket.socket | None = None
        self.inode = 0
        self.released = False

    def ioctl(self, request: int, definition: IoctlDef | None, buf: bytearray, fds: list[int],
              arg: int) -> int | tuple[int, list[int]]:
        """Returns the result, or (result, fds to hand to the caller)."""
        raise KernelError(errno.ENOTTY)

    def pread(self, length: int, offset: int) -> bytes:
        raise KernelError(errno.EINVAL)

    def pwrite(self, data: bytes, offset: int) -> int:
        raise KernelError(errno.EINVAL)

    def release(self) -> None:
        """The last reference is gone."""

    def describe(self) -> str:
        return self.kind

    def memory(self) -> set[tuple[int, int]]:
        """The machine memory this file references (see Kernel.collect_memory)."""
        return set()


class RealFile:
    """A file of the host's real kernel (a memfd, an eventfd) that the emulated
    kernel holds a reference to (its own dup)."""

    kind = "real"

    def __init__(self, fd: int):
        self.fd = os.dup(fd)
        st = os.fstat(self.fd)
        self.key = (st.st_dev, st.st_ino)
        self.mode = st.st_mode

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- struct helpers: the kernel's copy_struct_from_user ----------------------------------------


def copy_struct(buf: bytearray, argtype: str, min_field: str, *, trailing: bool = True):
    """The extensible-struct rules of iommufd and LUO: ``size`` below the
    end of ``min_field`` is EINVAL, non-zero bytes past what this kernel knows
    are E2BIG (when ``trailing``).  Returns (cdata copy, user size)."""
    if len(buf) < 4:
        raise KernelError(errno.EFAULT)
    user_size = int.from_bytes(buf[:4], "little")
    known = ffi.sizeof(argtype)
    minsz = ffi.offsetof(argtype, min_field) + ffi.sizeof(ffi.typeof(argtype).fields[
        [f[0] for f in ffi.typeof(argtype).fields].index(min_field)][1].type)
    if user_size < minsz:
        raise KernelError(errno.EINVAL, f"{argtype}: size {user_size} < {minsz}")
    if user_size > len(buf):
        raise KernelError(errno.EFAULT)
    if trailing and user_size > known and any(buf[known:user_size]):
        raise KernelError(errno.E2BIG, f"{argtype}: non-zero bytes past the {known} this kernel knows")
    cmd = ffi.new(argtype + " *")
    n = min(user_size, known)
    ffi.memmove(cmd, bytes(buf[:n]), n)
    return cmd, user_size


def respond(buf: bytearray, cmd, user_size: int) -> None:
    """copy_to_user of the struct, up to what the caller supplied."""
    n = min(user_size, ffi.sizeof(ffi.typeof(cmd).item))
    buf[:n] = ffi.buffer(cmd, n)


# --- the kernel ------------------------------------------------------------------------------------


#: The kernel's subsystems, (attribute, class) in the order they come up: a
#: subsystem's module registers it (register_subsystem), as a driver
#: registers its device nodes; the package's __init__ imports the built-in
#: ones.  A subsystem serves the nodes it names (``open_node``,
#: ``list_node``: None for a path that is not its), and goes with its kernel
#: (``drop``).
SUBSYSTEMS: list[tuple[str, type]] = []


def register_subsystem(attribute: str, cls: type) -> None:
    if attribute not in (a for a, _ in SUBSYSTEMS):
        SUBSYSTEMS.append((attribute, cls))


class Kernel:
    """One boot of the emulated kernel."""

    def __init__(self, machine, *, profile: str, generation: int, spawn: Callable[[File], None],
                 closing: Callable[[socket.socket], None] = lambda sock: None):
        self.machine = machine
        self.profile = profile
        self.generation = generation
        self.spawn = spawn
        #: Told before a file's socket is closed (the daemon's event loop may be waiting on it).
        self.closing = closing
        self.files: dict[int, File] = {}
        #: How many files may be open at once (set by the daemon from its fd limit).
        self.max_files = 1 << 20
        #: True while the old kernel is being discarded at kexec: release
        #: paths must not touch the hardware then.
        self.dropping = False
        #: Fault injection (luvmm.liveupdate.emu.faults.Faults), or None.
        self.faults = None
        #: Seconds an injected stall adds to the request being served (the daemon waits them out).
        self.stall = 0.0
        #: Kills a unit of init by name (set by the daemon, for injected faults).
        self.kill_unit: Callable[[str, str], None] = lambda unit, why: None
        self.subsystems = []
        for attribute, cls in SUBSYSTEMS:
            subsystem = cls(self)
            setattr(self, attribute, subsystem)  # kernel.luo, kernel.vfio, kernel.iommufd
            self.subsystems.append(subsystem)

    # --- fault injection --------------------------------------------------------------------

    def inject(self, point: str, handler: str | None = None, session: str | None = None) -> None:
        """Where luvmm.liveupdate.emu.faults may strike: fail here (EIO), stall the
        caller, or have init kill a unit."""
        if self.faults is None:
            return
        what = point + (f" of {handler}" if handler else "") + (f" in session {session!r}" if session else "")
        for rule in self.faults.at(point, handler, session):
            if rule.action == "stall":
                self.stall += rule.seconds
            elif rule.action == "kill":
                self.kill_unit(rule.unit, f"injected fault at {what}")
            elif rule.action == "fail":
                raise KernelError(errno.EIO, f"injected fault: {what} failed")

    def take_stall(self) -> float:
        stall, self.stall = self.stall, 0.0
        return stall

    # --- files ----------------------------------------------------------------------------

    def install(self, file: File) -> int:
        """Create the socketpair of a new file; returns the client's end (an fd
        the caller hands over and then closes).  ENFILE past max_files (the
        kernel's file-max): each file costs the daemon an fd."""
        if len(self.files) >= self.max_files:
            raise KernelError(errno.ENFILE, f"{len(self.files)} emulated files are open: the most there can be")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        file.sock = ours
        file.inode = os.fstat(theirs.fileno()).st_ino
        self.files[file.inode] = file
        self.spawn(file)
        return theirs.detach()

    def lookup(self, fd: int) -> File | None:
        """The emulated file behind a passed fd, identified by its socket inode."""
        try:
            st = os.fstat(fd)
        except OSError:
            raise KernelError(errno.EBADF) from None
        if stat.S_ISSOCK(st.st_mode):
            return self.files.get(st.st_ino)
        return None

    def alive(self, file: File | None) -> bool:
        """Whether a file still has a user; a file whose every client end is
        closed is released on the spot.  (close() in the client is
        asynchronous to the daemon: exclusive-open checks ask here, so that
        close-then-open behaves as it does on a real kernel.)"""
        if file is None or file.released:
            return False
        p = select.poll()
        p.register(file.sock, select.POLLHUP | select.POLLRDHUP)
        if p.poll(0):
            self.release(file)
            return False
        return True

    def release_closed(self) -> None:
        """Release every file whose client ends are all closed, now.  On a
        real kernel a file's release runs when its last fd is closed, before
        the closing task's next system call; here the daemon hears of a close
        asynchronously, when the file's task next runs.  The freeze asks
        first: a session its agent closed just before the reboot (`vm stop`
        letting go of a VM, then an update) must not be frozen into the KHO
        image and come back in the next kernel with no one to let go of it."""
        p = select.poll()
        by_fd = {}
        for file in self.files.values():
            if file.sock is not None and not file.released:
                p.register(file.sock, select.POLLHUP | select.POLLRDHUP)
                by_fd[file.sock.fileno()] = file
        for fd, _ in p.poll(0):
            self.release(by_fd[fd])

    def release(self, file: File) -> None:
        if file.released:
            return
        file.released = True
        self.files.pop(file.inode, None)
        try:
            file.release()
        finally:
            if file.sock is not None:
                self.closing(file.sock)
                file.sock.close()
        self.collect_memory()

    def collect_memory(self) -> None:
        """Free the machine memory nothing references any more: no IOMMU
        domain, no open file (an IOAS mapping a memfd), no LUO session (a
        preserved memfd, or one handed over and not finished).  On a real
        kernel a memfd's pages go when its last reference drops; here the
        machine keeps its own (a mapping, a hold), which would otherwise
        outlive the VM that made them until the next kexec -- a failed
        `vm start --memory 2G` left its 2 GiB behind."""
        if self.dropping:
            return  # the kexec collects what nothing preserved
        keep = set(self.luo.memory())
        for file in self.files.values():
            keep |= file.memory()
        self.machine.collect_memory(keep)

    # --- paths ------------------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        for subsystem in self.subsystems:
            file = subsystem.open_node(path)
            if file is not None:
                return self.install(file)
        raise KernelError(errno.ENOENT, f"{path}: no such device")

    def listdir(self, path: str) -> list[str]:
        path = path.rstrip("/")
        if path == "/sys/bus/pci/devices":
            return sorted(self.machine.devices)
        for subsystem in self.subsystems:
            names = subsystem.list_node(path)
            if names is not None:
                return names
        raise KernelError(errno.ENOENT, f"{path}: no such directory")

    # --- kexec -------------------------------------------------------------------------------

    def freeze(self) -> dict:
        """reboot(LINUX_REBOOT_CMD_KEXEC), first half: freeze every preserved
        file and serialize the KHO tree.  A failure unfreezes what was frozen
        and raises: nothing else happens.  What a task closed before its
        reboot call is released first (release_closed): it is not handed over."""
        self.release_closed()
        return {
            "compatible": "luvmm,kho-v1",
            "generation": self.generation,
            "profile": self.profile,
            "luo": self.luo.freeze(),
        }

    def preserved_hardware(self) -> tuple[set[str], set[int], set[tuple[int, int]]]:
        """The functions, domains and memory that the frozen state refers to."""
        return self.luo.preserved_hardware()

    def drop(self) -> None:
        """Every kernel object goes away (the old kernel is gone)."""
        self.dropping = True
        for file in list(self.files.values()):
            try:
                self.release(file)
            except Exception:  # a release must not stop the others
                log.exception("releasing %s at kexec", file.describe())
        for subsystem in self.subsystems:
            subsystem.drop()

    def restore(self, tree: dict) -> None:
        """Boot, second half: take over what the KHO tree describes.  A LUO
        tree of another ABI -- its compatible, or a shape this kernel does not
        read (another kernel's, or a bug's) -- panics the kernel, as
        luo_early_startup's failure does (luo_restore_fail: panic):
        KernelPanic, and the machine halts."""
        try:
            self.luo.restore(tree.get("luo", {}))
        except KernelPanic:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise KernelPanic(f"The incoming tree failed to initialize properly "
                              f"({type(e).__name__}: {e})") from None

    def reap(self) -> None:
        """Release every file whose users have all closed it."""
        for file in list(self.files.values()):
            self.alive(file)

    def status(self) -> dict:
        self.reap()
        return {
            "generation": self.generation,
            "profile": self.profile,
            "open_files": sorted(f.describe() for f in self.files.values()),
            "sessions": self.luo.status(),
            "vfio": self.vfio.status(),
        }
