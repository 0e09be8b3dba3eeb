"""Who is on the other end of a Unix socket, fixed when the connection is
made -- the identity the daemon and the agent authorize requests by.

SO_PEERCRED gives the pid, uid and gid the peer had when it connected, and
SO_PEERPIDFD (Linux 6.5) a pidfd of that very process: a pidfd cannot come
to mean another process, so a peer that connects and exits, leaving its
socket to a parent (or to whatever reuses its pid), is told apart from a live
one.  The unit is looked up while the pidfd shows the process alive; a peer
that exits during the look-up is refused rather than guessed at.  Lean (the
restore path imports it): ``_socket`` and ``select`` only.
"""

from __future__ import annotations

import errno
import os
import select
import struct
import _socket

#: include/uapi/asm-generic/socket.h (Linux 6.5); older kernels say ENOPROTOOPT.
SO_PEERPIDFD = 77
_UCRED = struct.Struct("3i")


class Peer:
    """A connection's peer: ``pid``, ``uid``, ``gid``, and ``unit`` (the
    init unit it belongs to, or None: not a unit's -- the operator's)."""

    __slots__ = ("pid", "uid", "gid", "unit")

    def __init__(self, pid: int, uid: int, gid: int, unit: str | None):
        self.pid, self.uid, self.gid, self.unit = pid, uid, gid, unit

    def __repr__(self) -> str:
        return f"Peer(pid={self.pid}, uid={self.uid}, unit={self.unit!r})"


def credentials(sock) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer when it connected."""
    return _UCRED.unpack(sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _UCRED.size))


def _pidfd(sock, pid: int) -> int:
    try:
        return struct.unpack("i", sock.getsockopt(_socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
    except OSError as e:
        if e.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
            raise
    return os.pidfd_open(pid)  # before 6.5: the pid, looked at now


def _exited(pidfd: int) -> bool:
    poll = select.poll()
    poll.register(pidfd, select.POLLIN)
    return bool(poll.poll(0))


def identify(sock, unit_of) -> Peer:
    """The peer of ``sock``; ``unit_of(pid)`` names its unit (or None).
    PermissionError (EPERM) if it cannot be identified: it exited already."""
    pid, uid, gid = credentials(sock)
    if pid <= 0:
        raise PermissionError(errno.EPERM, "the peer cannot be identified (no pid)")
    try:
        pidfd = _pidfd(sock, pid)
    except ProcessLookupError:
        raise PermissionError(errno.EPERM, f"the peer (pid {pid}) exited: it cannot be identified") from None
    try:
        if _exited(pidfd):
            raise PermissionError(errno.EPERM, f"the peer (pid {pid}) exited: it cannot be identified")
        unit = unit_of(pid)
        if _exited(pidfd):  # its pid may have been someone else's during the look-up
            raise PermissionError(errno.EPERM, f"the peer (pid {pid}) exited while it was identified")
    finally:
        os.close(pidfd)
    return Peer(pid, uid, gid, unit)
