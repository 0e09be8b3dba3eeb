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
luvmm's own init (luvmm.liveupdate.init: the emulated host's, `luvmm boot`'s) does
the same.  Either way the store lives in init, not in the LUO agent: an
agent that dies takes nothing with it.

A VM's store holds its files under the names of :meth:`luvmm.vmm.vm.Vm.files` and
``meta``, a sealed memfd with what the files are (JSON).  Lean: the restore
path stores right after the guest resumes.

**Sockets** come the same way, and first: a unit's listening sockets --
systemd's socket units (FileDescriptorName=), luvmm's init's unit
``sockets`` -- are passed to every process of the unit, at every start, a
cold one and one after a kexec too, named in ``$LISTEN_FDNAMES`` beside
the stored files.  :data:`SOCKETS` are their names: :func:`sockets` takes
them out of what :func:`listen_fds` found, and :func:`take` never takes one
for a stored file.
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
#: luvmm's init names itself instead of $LISTEN_PID (the pid of a process
#: it posix_spawn()s is not known before it runs): the fds are for the
#: process whose parent that is -- the unit's own, not a child of it.
LISTEN_PARENT_ENV = "LUVMM_LISTEN_PARENT"
#: The names of the sockets a unit is passed (its FileDescriptorName=): never a stored file's.
METRICS = "metrics"
SOCKETS = (METRICS,)


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


#: The incoming LUO session a restoring VMM retrieved: kept by init until
#: the VM's own files are stored (or the session is finished), so that a
#: VMM and agent killed together during the restore lose nothing -- the
#: session is not released (and finished: its files let go) while init
#: holds it, and the VMM init starts next restores from it.
INCOMING = "incoming"
#: What a unit is passed beside the VM's stored files: never taken for one of them.
NOT_STORED_FILES = SOCKETS + (INCOMING,)


def store(files: dict[str, int], meta: dict | None = None, *, replace: bool = True) -> None:
    """Leave ``{name: fd}`` (and ``meta``) in this unit's store, replacing
    what was stored under those names (``replace`` False: nothing was, as
    after a kexec -- a notification less on the restore's path).  The fds
    stay ours too."""
    names = list(files) + ([META] if meta is not None else [])
    for name in names if replace else ():  # systemd keeps every fd stored; drop the old ones of these names first
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


def remove(name: str) -> None:
    """``FDSTOREREMOVE=1``: what was stored under ``name`` goes.  Nothing where no init listens."""
    try:
        _notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
    except OSError:
        pass


def listen_fds() -> dict[str, int]:
    """The fds init passed this process (``sd_listen_fds_with_names``), by
    name; {} if none (or if they were meant for another: $LISTEN_PID, or
    luvmm's init's LISTEN_PARENT_ENV, names some other process).  The environment variables are cleared, as
    sd_listen_fds(unset_environment=1) does."""
    parent = os.environ.pop(LISTEN_PARENT_ENV, None)
    try:
        count = int(os.environ.pop("LISTEN_FDS", "0"))
        pid = int(os.environ.pop("LISTEN_PID", "0"))
    except ValueError:
        return {}
    names = os.environ.pop("LISTEN_FDNAMES", "").split(":")
    ours = pid == os.getpid() or not pid and parent is not None and parent == str(os.getppid())
    if not ours or count <= 0:
        return {}
    fds = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
        fds[names[i] if i < len(names) and names[i] else f"fd{i}"] = fd
    return fds


def sockets(fds: dict[str, int]) -> dict[str, int]:
    """The sockets of :data:`SOCKETS` among ``fds`` (what :func:`listen_fds`
    found), taken out of it: what is left is the fd store's."""
    return {name: fds.pop(name) for name in SOCKETS if name in fds}


def take(fds: dict[str, int] | None = None) -> tuple[dict, dict[str, int]] | None:
    """(meta, {name: fd}) that a previous process of this unit stored, or
    None (and what was passed is closed).  ``fds``: what :func:`listen_fds`
    found, its sockets taken out (:func:`sockets`); None: :func:`listen_fds`
    now, its sockets and kept session closed -- neither is a stored file."""
    if fds is None:
        fds = listen_fds()
        for name in NOT_STORED_FILES:
            if name in fds:
                os.close(fds.pop(name))
    fds = {name: fd for name, fd in fds.items() if name not in NOT_STORED_FILES}
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
