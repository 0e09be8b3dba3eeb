"""The emulated implementation of the host interface: a client of the
emulated host daemon (``luvmm host start``).

    from luvmm.liveupdate.emu.client import connect
    host = connect("/run/luvmm/host.sock")   # a luvmm.host.Host

Paths under /dev/vfio/, /dev/iommu, /dev/liveupdate and /sys/bus/pci/ belong
to the emulated kernel; everything else (/dev/kvm, memfds, eventfds) is this
machine's real kernel.  An fd is emulated when it is a socket whose peer is
the daemon (SO_PEERCRED), however it reached this process -- from open(), an
ioctl that returned one, or another process over SCM_RIGHTS -- so the same
code handles a session fd the agent passed to a VMM.  This module is the
client side of the protocol only: it never imports the emulator.
"""

from __future__ import annotations

import errno
import mmap as _mmap
import os
import _socket
import stat
import struct
import _thread  # not `threading` (4 ms of imports on the restore path)

from luvmm import rpc
from luvmm.abi import IoctlDef, ffi
from luvmm.host import Host, RealHost, ioctl_error
from luvmm.wire import (
    close_fds,
    MAX_PAYLOAD,
    OP_IOCTL,
    OP_PREAD,
    OP_PWRITE,
    OP_PWRITE_POSTED,
    REPLY,
    REQUEST,
    ioctl_fd_offsets,
    out_fd_offsets,
    recv_msg,
    send_msg,
)

EMULATED_PATHS = ("/dev/vfio/", "/dev/iommu", "/dev/liveupdate", "/sys/bus/pci/")
#: How long a control request may take (a kexec: freeze, KHO, a new kernel, units started; stalls injected).
CONTROL_TIMEOUT = 120.0
_SO_PEERCRED = struct.Struct("3i")


class HostGone(OSError):
    """The daemon is not answering on the control socket."""


def connect(socket_path: str) -> "EmulatedHost":
    """Connect to a running emulated host by its control socket."""
    return EmulatedHost(socket_path)


def _emulated_path(path: str) -> bool:
    return any(path == p.rstrip("/") or path.startswith(p) for p in EMULATED_PATHS)


class EmulatedHost(Host):
    kind = "emulated"

    def __init__(self, socket_path: str):
        self.socket_path = socket_path
        self.real = RealHost()
        self._control = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
        try:
            self._control.connect(socket_path)
        except OSError as e:
            self._control.close()
            raise HostGone(e.errno or errno.ECONNREFUSED, f"no emulated host at {socket_path}: {e.strerror}") from None
        self._control_lock = _thread.allocate_lock()
        self._tag = int.from_bytes(os.urandom(4), "little")  # not 0, nor another process's sequence
        self._locks: dict[int, _thread.LockType] = {}
        self._locks_lock = _thread.allocate_lock()
        self._peers: dict[tuple[int, int], bool] = {}
        hello = self.call({"op": "hello"})[0]
        self.daemon_pid = hello["pid"]

    # --- control socket --------------------------------------------------------------

    def call(self, request: dict, fds: list[int] = (), *, timeout: float = CONTROL_TIMEOUT) -> tuple[object, list[int]]:
        """One control request; returns (the reply's "ok" value, fds) or
        raises OSError (HostGone: the daemon went away or did not answer)."""
        with self._control_lock:
            try:
                return rpc.call(self._control, request, fds, timeout=timeout, who="the emulated host")
            except rpc.RpcError as e:
                if e.errno in (errno.ECONNRESET, errno.ETIMEDOUT):
                    raise HostGone(e.errno, e.strerror) from None
                raise OSError(e.errno, e.strerror) from None

    def close_connection(self) -> None:
        self._control.close()

    # --- which fds are emulated ------------------------------------------------------------

    def is_emulated(self, fd: int) -> bool:
        """Whether ``fd`` is a file of the emulated kernel.  Asked on every
        ioctl, pread and pwrite -- every guest MMIO access goes through here --
        so the answer is kept per socket inode (sockfs never reuses one while
        the socket lives) and only a new socket costs the SO_PEERCRED query."""
        try:
            st = os.fstat(fd)
        except OSError:
            return False
        if not stat.S_ISSOCK(st.st_mode):
            return False
        key = (st.st_dev, st.st_ino)
        known = self._peers.get(key)
        if known is None:
            known = self._peers[key] = self._peer_is_daemon(fd)
        return known

    def _peer_is_daemon(self, fd: int) -> bool:
        try:
            s = _socket.socket(fileno=os.dup(fd))
        except OSError:
            return False
        try:
            pid, _, _ = _SO_PEERCRED.unpack(s.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _SO_PEERCRED.size))
        except OSError:
            return False
        finally:
            s.close()
        return pid == self.daemon_pid

    def _lock(self, fd: int) -> _thread.LockType:
        with self._locks_lock:
            lock = self._locks.get(fd)
            if lock is None:
                lock = self._locks[fd] = _thread.allocate_lock()
            return lock

    def _transact(self, fd: int, op: int, arg: int, arg64: int, payload: bytes, fds: list[int],
                  on_error_payload=None) -> tuple[int, bytes, list[int]]:
        """One request on a file socket.  The fd *is* the socket.  A failing
        call may still carry the struct the kernel copied out before failing
        (IOAS_IOVA_RANGES' EMSGSIZE): ``on_error_payload`` receives it.
        Replies with another tag answer a request of a process that held the
        file before us and died waiting: they are dropped."""
        sock = _socket.socket(fileno=fd)
        try:
            with self._lock(fd):
                self._tag = tag = (self._tag + 1) & 0xFFFFFFFF
                try:
                    send_msg(sock, REQUEST.pack(op, arg, arg64, tag) + payload, fds)
                    while True:
                        data, got = recv_msg(sock)
                        if len(data) < REPLY.size or REPLY.unpack_from(data)[2] == tag:
                            break
                        close_fds(got)
                except (BrokenPipeError, ConnectionResetError):
                    data, got = b"", []
        finally:
            sock.detach()
        if len(data) < REPLY.size:
            raise OSError(errno.EIO, "the emulated kernel dropped this file (was there a kexec?)")
        result, err, _ = REPLY.unpack_from(data)
        if err:
            close_fds(got)
            if on_error_payload is not None and len(data) > REPLY.size:
                on_error_payload(data[REPLY.size:])
            raise OSError(err, os.strerror(err))
        return result, data[REPLY.size:], got

    # --- the host interface -------------------------------------------------------------------

    def open(self, path: str, flags: int = os.O_RDWR) -> int:
        if not _emulated_path(path):
            return self.real.open(path, flags)
        _, fds = self.call({"op": "open", "path": path, "flags": flags})
        if len(fds) != 1:
            close_fds(fds)
            raise OSError(errno.EPROTO, "the emulated host did not return one fd")
        return fds[0]

    def close(self, fd: int) -> None:
        os.close(fd)
        with self._locks_lock:
            self._locks.pop(fd, None)

    def _ioctl(self, fd: int, request: int, arg, definition: IoctlDef | None) -> int:
        if not self.is_emulated(fd):
            return self.real._ioctl(fd, request, arg, definition)
        if isinstance(arg, int):
            result, _, got = self._transact(fd, OP_IOCTL, request, arg & 0xFFFFFFFFFFFFFFFF, b"", [])
            close_fds(got)
            return result
        view = memoryview(arg).cast("B")
        payload = bytes(view)
        if len(payload) > MAX_PAYLOAD:
            raise OSError(errno.E2BIG, f"{definition.name if definition else 'ioctl'}: argument too large")
        send_fds = []
        for off in ioctl_fd_offsets(definition, payload):
            (value,) = struct.unpack_from("<i", payload, off)
            if value >= 0:
                send_fds.append(value)
        def copy_back(reply: bytes) -> None:
            size = min(len(payload), len(reply))
            view[:size] = reply[:size]

        try:
            result, reply, got = self._transact(fd, OP_IOCTL, request, len(payload), payload,
                                                send_fds, copy_back)
        except OSError as e:
            raise ioctl_error(e.errno, request) from None
        size = min(len(payload), len(reply))
        view[:size] = reply[:size]
        # fds the kernel created for us: patch our numbers into the struct.
        out = out_fd_offsets(definition)
        for off, newfd in zip(out, got):
            struct.pack_into("<i", view, off, newfd)
        close_fds(got[len(out):])
        if definition is not None and definition.user_out_buffers and len(reply) > len(payload):
            self._copy_to_user(definition, payload, reply[len(payload):])
        return result

    @staticmethod
    def _copy_to_user(definition: IoctlDef, request: bytes, data: bytes) -> None:
        pos = 0
        for ptr_field, count_field, elemtype in definition.user_out_buffers:
            ptr = struct.unpack_from("<Q", request, definition.offsetof(ptr_field))[0]
            count = struct.unpack_from("<I", request, definition.offsetof(count_field))[0]
            room = count * ffi.sizeof(elemtype)
            chunk = data[pos:pos + room]
            if ptr and chunk:
                ffi.memmove(ffi.cast("void *", ptr), chunk, len(chunk))
            pos += room

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        if not self.is_emulated(fd):
            return self.real.pread(fd, length, offset)
        out = bytearray()
        while len(out) < length:
            n = min(length - len(out), MAX_PAYLOAD)
            _, data, got = self._transact(fd, OP_PREAD, n, offset + len(out), b"", [])
            close_fds(got)
            out += data
            if len(data) < n:
                break
        return bytes(out)

    def pwrite(self, fd: int, data, offset: int) -> int:
        if not self.is_emulated(fd):
            return self.real.pwrite(fd, data, offset)
        data = bytes(data)
        done = 0
        while done < len(data) or not data:
            chunk = data[done:done + MAX_PAYLOAD]
            written, _, got = self._transact(fd, OP_PWRITE, len(chunk), offset + done, chunk, [])
            close_fds(got)
            done += written
            if written < len(chunk) or not data:
                break
        return done

    def region_access(self, fd: int) -> tuple[str, int]:
        if self.is_emulated(fd):
            return ("wire", OP_PWRITE_POSTED)
        return self.real.region_access(fd)

    def mmap(self, fd: int, length: int, offset: int = 0, *,
             prot: int = _mmap.PROT_READ | _mmap.PROT_WRITE, flags: int = _mmap.MAP_SHARED) -> _mmap.mmap:
        if self.is_emulated(fd):
            # vfio_pci_core_mmap: EINVAL for a region without
            # VFIO_REGION_INFO_FLAG_MMAP, which no emulated region has.
            raise OSError(errno.EINVAL, "this region does not offer mmap (no VFIO_REGION_INFO_FLAG_MMAP)")
        return self.real.mmap(fd, length, offset, prot=prot, flags=flags)

    def listdir(self, path: str) -> list[str]:
        if not _emulated_path(path):
            return self.real.listdir(path)
        return self.call({"op": "listdir", "path": path})[0]

    def kexec(self) -> dict:
        """Returns what the host reports: the new generation, the KHO image
        size, how long it took, and whether the new kernel refused the image."""
        return self.call({"op": "kexec"})[0]
