"""Typed LUO handles: ``LiveUpdate`` (/dev/liveupdate) -> ``Session``.

A session is a named set of preserved files.  Before a kexec: create it,
PRESERVE_FD each file under a token (and keep the session fd open: closing it
unpreserves everything).  After the kexec: RETRIEVE_SESSION by name,
RETRIEVE_FD each token, and FINISH once the workload is verified.
"""

from __future__ import annotations

import os

from luvmm.abi import ffi, new_arg
from luvmm.host import Host, KernelObject
from luvmm.uapi.luo import (
    LIVEUPDATE_IOCTL_CREATE_SESSION,
    LIVEUPDATE_IOCTL_RETRIEVE_SESSION,
    LIVEUPDATE_SESSION_FINISH,
    LIVEUPDATE_SESSION_GET_NAME,
    LIVEUPDATE_SESSION_NAME_LENGTH,
    LIVEUPDATE_SESSION_PRESERVE_FD,
    LIVEUPDATE_SESSION_RETRIEVE_FD,
)

LIVEUPDATE_DEV = "/dev/liveupdate"


def _name_bytes(name: str | bytes) -> bytes:
    raw = name.encode() if isinstance(name, str) else bytes(name)
    if len(raw) > LIVEUPDATE_SESSION_NAME_LENGTH:
        # Cannot even be put in the struct; shorter bad names (empty, 64 bytes
        # with no NUL) go to the kernel: CREATE says EINVAL (luo_session_create),
        # RETRIEVE ENOENT (luo_session_retrieve does no length check).
        raise ValueError(f"session name is {len(raw)} bytes; the struct holds {LIVEUPDATE_SESSION_NAME_LENGTH}")
    return raw


class LiveUpdate(KernelObject):
    """/dev/liveupdate (one opener at a time: a second open is EBUSY)."""

    @classmethod
    def open(cls, host: Host, path: str = LIVEUPDATE_DEV) -> LiveUpdate:
        return cls(host, host.open(path, os.O_RDWR))

    def _session(self, request: int, argtype: str, name: str | bytes) -> Session:
        arg = new_arg(argtype)
        raw = _name_bytes(name)
        ffi.memmove(arg.name, raw, len(raw))
        self.ioctl(request, arg)
        return Session(self.host, arg.fd, raw.decode(errors="replace"))

    def create_session(self, name: str | bytes) -> Session:
        return self._session(LIVEUPDATE_IOCTL_CREATE_SESSION, "struct liveupdate_ioctl_create_session", name)

    def retrieve_session(self, name: str | bytes) -> Session:
        return self._session(LIVEUPDATE_IOCTL_RETRIEVE_SESSION, "struct liveupdate_ioctl_retrieve_session",
                             name)


class Session(KernelObject):
    """A LUO session fd."""

    def __init__(self, host: Host, fd: int, name: str):
        super().__init__(host, fd)
        self.name = name

    def preserve_fd(self, fd: int, token: int) -> None:
        self.ioctl(LIVEUPDATE_SESSION_PRESERVE_FD,
                   new_arg("struct liveupdate_session_preserve_fd", fd=fd, token=token))

    def retrieve_fd(self, token: int) -> int:
        arg = new_arg("struct liveupdate_session_retrieve_fd", token=token)
        self.ioctl(LIVEUPDATE_SESSION_RETRIEVE_FD, arg)
        return arg.fd

    def finish(self) -> None:
        self.ioctl(LIVEUPDATE_SESSION_FINISH, new_arg("struct liveupdate_session_finish"))

    def get_name(self) -> str:
        arg = new_arg("struct liveupdate_session_get_name")
        self.ioctl(LIVEUPDATE_SESSION_GET_NAME, arg)
        return ffi.string(arg.name).decode(errors="replace")
