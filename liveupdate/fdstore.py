"""A unit's file descriptor store, through systemd's own protocol: what a VMM
leaves with init so that, if it dies, the VMM init starts next picks the VM
up on the very same RAM, iommufd and device (DMA never stopped).

* Storing is ``sd_notify``: a datagram ``FDSTORE=1`` / ``FDNAME=NAME`` with
  the fds attached, to ``$NOTIFY_SOCKET`` (``FDSTOREREMOVE=1`` drops a name).
* Getting them back is ``sd_listen_fds_with_names``: a unit started again
  finds them from fd 3 (SD_LISTEN_FDS_START) on, named by
  ``$LISTEN_FDNAMES`` and meant for ``$LISTEN_PID``.

systemd keeps the store while the unit is restarted after a failure and
flushes it when the unit is stopped (FileDescriptorStoreMax= bounds it);
luvmm's own init (liveupdate.init: the emulated host's, `luvmm boot`'s) does
the same.  Either way the store lives in init, not in the LUO agent: an
agent that dies takes nothing with it.

A VM's store holds its files under the names of :meth:`vmm.vm.Vm.files` and
``meta``, a sealed memfd with what the files are (JSON).  Lean: the restore
path stores right after the guest resumes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import _socket

from luvmm import leanjson
from luvmm.wire import ancillary

SD_LISTEN_FDS_START = 3
META = "meta"


class FdStoreError(OSError):
    pass


def _notify(message: str, fds: list[int] = ()) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        raise FdStoreError(errno.ENOTCONN, "no $NOTIFY_SOCKET: not started by an init with a file descriptor store")
    if path.startswith("@"):
        path = "\0" + path[1:]  # an abstract socket, as systemd allows
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
    try:
        sock.sendmsg([message.encode()], ancillary(list(fds)), 0, path)
    finally:
        sock.close()


def ready() -> None:
    """``READY=1``: the unit is up -- a VMM says so once its guest runs
    (again).  Nothing where no init listens."""
    try:
        _notify("READY=1")
    except OSError:
        pass


def store(files: dict[str, int], meta: dict | None = None) -> None:
    """Leave ``{name: fd}`` (and ``meta``) in this unit's store, replacing
    what was stored under those names.  The fds stay ours too."""
    names = list(files) + ([META] if meta is not None else [])
    for name in names:  # systemd keeps every fd stored; drop the old ones of these names first
        _notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
    memfd = None
    if meta is not None:
        memfd = os.memfd_create("luvmm-fdstore-meta", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.write(memfd, leanjson.dumps(meta).encode())
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_WRITE)
    try:
        for name, fd in files.items():
            _notify(f"FDSTORE=1\nFDNAME={name}", [fd])
        if memfd is not None:
            _notify(f"FDSTORE=1\nFDNAME={META}", [memfd])
    finally:
        if memfd is not None:
            os.close(memfd)


def listen_fds() -> dict[str, int]:
    """The fds init passed this process (``sd_listen_fds_with_names``), by
    name; {} if none.  The environment variables are cleared, as
    sd_listen_fds(unset_environment=1) does."""
    try:
        count = int(os.environ.pop("LISTEN_FDS", "0"))
        pid = int(os.environ.pop("LISTEN_PID", "0"))
    except ValueError:
        return {}
    names = os.environ.pop("LISTEN_FDNAMES", "").split(":")
    if pid != os.getpid() or count <= 0:
        return {}
    fds = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
        fds[names[i] if i < len(names) and names[i] else f"fd{i}"] = fd
    return fds


def take() -> tuple[dict, dict[str, int]] | None:
    """(meta, {name: fd}) that a previous process of this unit stored, or None."""
    fds = listen_fds()
    memfd = fds.pop(META, None)
    if memfd is None:
        for fd in fds.values():
            os.close(fd)
        return None
    try:
        size = os.fstat(memfd).st_size
        meta = leanjson.loads(os.pread(memfd, size, 0))
    except (OSError, ValueError):
        for fd in fds.values():
            os.close(fd)
        return None
    finally:
        os.close(memfd)
    return meta, fds
