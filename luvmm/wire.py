"""The emulated host's wire protocol, shared by the client (:mod:`luvmm.liveupdate.emu.client`)
and the daemon (:mod:`luvmm.liveupdate.emu.daemon`).

Two kinds of SOCK_SEQPACKET sockets (message boundaries and SCM_RIGHTS):

* the **control socket** ``host.sock`` in the state dir: JSON requests such as
  ``{"op": "open", "path": "/dev/iommu", "flags": 2}``; replies are JSON
  ``{"ok": ...}`` or ``{"errno": N, "error": "..."}``, with fds attached where
  a request creates one (open);
* one **file socket** per emulated file: the client holds one end of a
  socketpair made by the daemon -- that end *is* the file descriptor -- and
  sends binary requests on it.  A request is a 20-byte header
  ``<B op, 3 pad, I arg, Q arg64, I tag>`` followed by the payload (the ioctl's
  struct bytes, or the data of a pwrite); the fds the struct names travel as
  SCM_RIGHTS in the order of :func:`ioctl_fd_offsets`.  A reply is a 12-byte
  header ``<i result, I errno, I tag>`` followed by the payload (the struct as
  the kernel left it, read data) and the fds the kernel returns.  The tag is
  the request's: a file outlives the process that made a request on it when
  the file was passed on (an fd store, SCM_RIGHTS), and the next holder must
  tell a reply meant for the dead one from its own.  An ``OP_PWRITE_POSTED``
  request gets no reply at all: it is a posted MMIO write (the vCPU run loop
  in C sends it for a guest's store to a trapped BAR), sent whole in one
  message by any thread while another waits for its own reply.
"""

from __future__ import annotations

import _socket
import struct

from luvmm import leanjson
from luvmm.abi import IoctlDef, ffi

OP_IOCTL = 1
OP_PREAD = 2
OP_PWRITE = 3
#: A pwrite with no reply: a posted MMIO write, as the vCPU run loop (vmm/runloop.c)
#: sends one for a trapped BAR store.  Its errors are dropped, as a bus drops them.
OP_PWRITE_POSTED = 4

REQUEST = struct.Struct("<BxxxIQI")
REPLY = struct.Struct("<iII")
#: Largest message on any socket (header + payload); larger reads and writes are split.
MAX_MESSAGE = 256 * 1024
MAX_PAYLOAD = MAX_MESSAGE - REQUEST.size
MAX_FDS = 64

# VFIO_DEVICE_SET_IRQS carries its eventfds in data[], not in a named field.
_VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2


class ProtocolError(ValueError):
    """A message that does not follow this protocol."""


def ioctl_fd_offsets(definition: IoctlDef | None, buf: bytes | bytearray | memoryview) -> list[int]:
    """Offsets of the s32 fds an ioctl's struct carries into the kernel."""
    if definition is None or definition.argtype is None:
        return []
    offsets = [definition.offsetof(f) for f in definition.fd_fields]
    if definition.name == "VFIO_DEVICE_SET_IRQS" and len(buf) >= 20:
        flags, count = struct.unpack_from("<I", buf, 4)[0], struct.unpack_from("<I", buf, 16)[0]
        if flags & _VFIO_IRQ_SET_DATA_EVENTFD:
            base = ffi.sizeof("struct vfio_irq_set")
            count = min(count, (len(buf) - base) // 4, MAX_FDS)
            offsets += [base + 4 * i for i in range(count)]
    return offsets


def out_fd_offsets(definition: IoctlDef | None) -> list[int]:
    if definition is None or definition.argtype is None:
        return []
    return [definition.offsetof(f) for f in definition.out_fd_fields]


def ancillary(fds) -> list:
    """The SCM_RIGHTS control message carrying ``fds`` (none: no message)."""
    if not fds:
        return []
    return [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]


def send_msg(sock, data: bytes, fds: list[int] = ()) -> None:
    sock.sendmsg([data], ancillary(fds))


def listen_seqpacket(path: str, backlog: int = 64, *, lean: bool = False):
    """A listening SOCK_SEQPACKET socket at ``path`` that only its owner can
    connect to (mode 0600 from the start: no window where it is wider).
    A ``socket.socket`` (trio wraps those), or with ``lean`` a bare
    ``_socket.socket`` (no ``socket`` import on the restore path)."""
    import os

    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    if lean:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    else:
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(backlog)
    return sock


def recv_msg(sock, maxfds: int = MAX_FDS) -> tuple[bytes, list[int]]:
    """Receive one message and its fds (always O_CLOEXEC).  Empty data: EOF."""
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, _socket.CMSG_SPACE(maxfds * 4), _socket.MSG_CMSG_CLOEXEC)
    return data, fds_from_ancillary(ancdata, flags)


def fds_from_ancillary(ancdata, flags: int) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.extend(struct.unpack(f"{len(payload) // 4}i", payload[:len(payload) - len(payload) % 4]))
    if flags & _socket.MSG_CTRUNC:
        # Too many fds: the kernel closed the rest; refuse the message.
        close_fds(fds)
        raise ProtocolError("too many file descriptors in one message")
    if flags & _socket.MSG_TRUNC:
        # Longer than any message of this protocol: what was read is a part of it.
        close_fds(fds)
        raise ProtocolError(f"a message longer than {MAX_MESSAGE} bytes")
    return fds


def close_fds(fds) -> None:
    """Close fds that arrived with a message and are not kept."""
    import os

    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def encode_json(obj: dict) -> bytes:
    return leanjson.dumps(obj).encode()


def decode_json(data: bytes) -> dict:
    """A JSON object, or ProtocolError -- for any input at all (the C scanner
    underneath raises more than ValueError on some: see leanjson)."""
    try:
        obj = leanjson.loads(data)
    except Exception as e:  # noqa: BLE001 -- a peer's bytes must never crash a server
        raise ProtocolError(f"not JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("a message must be a JSON object")
    return obj
