"""LUO: /dev/liveupdate and its sessions (kernel/liveupdate/luo_core.c,
luo_session.c, luo_file.c), without a kexec.

These run in the outgoing boot of a kernel that was not kexec'd into: there
are no incoming sessions, so every RETRIEVE_SESSION is ENOENT.
"""

from __future__ import annotations

import os
import struct

from luvmm.liveupdate.luo import LiveUpdate
from luvmm.abi import _IO, _IOC_NR, ffi, new_arg
from luvmm.lab.conformance import LocalFds, case, errno_of
from luvmm.uapi.luo import (
    LIVEUPDATE_CMD_RETRIEVE_SESSION,
    LIVEUPDATE_CMD_SESSION_GET_NAME,
    LIVEUPDATE_IOCTL_CREATE_SESSION,
    LIVEUPDATE_IOCTL_RETRIEVE_SESSION,
    LIVEUPDATE_IOCTL_TYPE,
    LIVEUPDATE_SESSION_FINISH,
    LIVEUPDATE_SESSION_GET_NAME,
    LIVEUPDATE_SESSION_NAME_LENGTH,
    LIVEUPDATE_SESSION_PRESERVE_FD,
    LIVEUPDATE_SESSION_RETRIEVE_FD,
)

CREATE = "struct liveupdate_ioctl_create_session"


def _luo(ctx) -> LiveUpdate:
    luo = LiveUpdate.open(ctx.host)
    ctx.track(luo.fd)
    return luo


def _session(ctx, luo: LiveUpdate, name):
    s = luo.create_session(name)
    ctx.track(s.fd)
    return s

def _raw(ctx, target: int, request: int, argtype: str, size: int | None = None, *, total: int | None = None,
         **fields) -> tuple[int, bytearray]:
    """The ioctl with a struct of ``size`` (default: the kernel's) in a buffer of
    ``total`` bytes; (errno, buffer).  An fd the kernel hands back is tracked."""
    arg = new_arg(argtype, **fields)
    if size is not None:
        arg.size = size
    known = ffi.sizeof(argtype)
    buf = bytearray(max(known, total or 0))
    buf[:known] = ffi.buffer(arg)
    err = errno_of(ctx.host.ioctl, target, request, buf)
    if not err and "fd" in dict(ffi.typeof(argtype).fields) and request in (
            LIVEUPDATE_IOCTL_CREATE_SESSION, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, LIVEUPDATE_SESSION_RETRIEVE_FD):
        ctx.track(struct.unpack_from("<i", buf, 4)[0])
    return err, buf


def _raw_name(ctx, fd: int, request: int, argtype: str, name: bytes, size: int | None = None,
              total: int | None = None, tail: bytes = b"") -> tuple[int, bytearray]:
    arg = new_arg(argtype)
    ffi.memmove(arg.name, name, len(name))
    if size is not None:
        arg.size = size
    known = ffi.sizeof(argtype)
    buf = bytearray(max(known, total or 0))
    buf[:known] = ffi.buffer(arg)
    if tail:
        buf[len(buf) - len(tail):] = tail
    err = errno_of(ctx.host.ioctl, fd, request, buf)
    if not err:
        ctx.track(struct.unpack_from("<i", buf, 4)[0])
    return err, buf


def _get_name_raw(ctx, fd: int) -> bytes:
    arg = new_arg("struct liveupdate_session_get_name")
    ctx.host.ioctl(fd, LIVEUPDATE_SESSION_GET_NAME, ffi.buffer(arg))
    raw = bytes(ffi.buffer(arg.name))
    return raw[:raw.index(b"\0")] if b"\0" in raw else raw


# --- luo_core.c: /dev/liveupdate ------------------------------------------------------------


@case("luo")
def case_second_open_of_dev_liveupdate(ctx):
    """luo_core.c luo_open: one opener at a time (-EBUSY)."""
    _luo(ctx)
    return errno_of(lambda: ctx.track(LiveUpdate.open(ctx.host).fd))


@case("luo")
def case_sessions_outlive_the_dev_fd(ctx):
    """luo_core.c luo_release only clears in_use: the outgoing sessions stay
    (luo_session_insert: the name is still taken, -EEXIST, after /dev/liveupdate
    is closed and opened again), and the free-again open succeeds."""
    luo = LiveUpdate.open(ctx.host)
    _session(ctx, luo, "conformance-outlive")
    luo.close()
    luo = _luo(ctx)
    return {"create_again": errno_of(_session, ctx, luo, "conformance-outlive")}


@case("luo")
def case_dev_unknown_ioctls(ctx):
    """luo_core.c luo_ioctl: an nr past the table is -EINVAL (a session
    ioctl's nr too), a number whose nr is in the table but whose encoding is
    not the op's is -ENOIOCTLCMD (ENOTTY to userspace)."""
    luo = _luo(ctx)
    past = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_RETRIEVE_SESSION + 1)
    buf = bytearray(ffi.sizeof(CREATE))
    return {
        "nr_past_the_table": errno_of(ctx.host.ioctl, luo.fd, past, bytearray(8)),
        "session_ioctl_on_dev": errno_of(ctx.host.ioctl, luo.fd, LIVEUPDATE_SESSION_GET_NAME, bytearray(72)),
        "wrong_encoding": errno_of(ctx.host.ioctl, luo.fd, LIVEUPDATE_IOCTL_CREATE_SESSION | 1 << 30, buf),
    }


# --- luo_session.c: names ---------------------------------------------------------------------


@case("luo")
def case_create_a_session_twice(ctx):
    """luo_session.c luo_session_insert: a name already outgoing is -EEXIST."""
    luo = _luo(ctx)
    _session(ctx, luo, "conformance-dup")
    return errno_of(_session, ctx, luo, "conformance-dup")


@case("luo")
def case_session_get_name(ctx):
    """LIVEUPDATE_SESSION_GET_NAME gives back the name given at CREATE."""
    luo = _luo(ctx)
    return _session(ctx, luo, "conformance-name").get_name()


@case("luo")
def case_create_session_name_length(ctx):
    """luo_session.c luo_session_create: strnlen(name, 64) of 0 (empty) or 64
    (no NUL) is -EINVAL; 63 bytes is the longest name."""
    luo = _luo(ctx)
    return {
        "empty": _raw_name(ctx, luo.fd, LIVEUPDATE_IOCTL_CREATE_SESSION, CREATE, b"")[0],
        "64_bytes_no_nul": _raw_name(ctx, luo.fd, LIVEUPDATE_IOCTL_CREATE_SESSION, CREATE,
                                     b"N" * LIVEUPDATE_SESSION_NAME_LENGTH)[0],
        "63_bytes": _raw_name(ctx, luo.fd, LIVEUPDATE_IOCTL_CREATE_SESSION, CREATE,
                              b"M" * (LIVEUPDATE_SESSION_NAME_LENGTH - 1))[0],
    }


@case("luo")
def case_create_session_any_bytes(ctx):
    """luo_session.c luo_session_create/luo_session_alloc: a name is any bytes
    up to the NUL (strscpy, no encoding check); GET_NAME (luo_session_get_name)
    gives the same bytes back, and what follows the NUL is not part of it
    (luo_session_insert strncmp: "abc\\0xyz" is "abc", -EEXIST)."""
    luo = _luo(ctx)
    odd = bytes([0xFF, 0xFE, 0x80, 0x01, 0x20, 0x0A, 0x2F, 0x7F]) + "é".encode()
    err, buf = _raw_name(ctx, luo.fd, LIVEUPDATE_IOCTL_CREATE_SESSION, CREATE, odd)
    out = {"create_odd": err}
    if not err:
        out["get_name_odd"] = _get_name_raw(ctx, struct.unpack_from("<i", buf, 4)[0]).hex()
    err, buf = _raw_name(ctx, luo.fd, LIVEUPDATE_IOCTL_CREATE_SESSION, CREATE, b"abc\0xyz")
    out["create_abc_nul_xyz"] = err
    if not err:
        out["get_name_abc_nul_xyz"] = _get_name_raw(ctx, struct.unpack_from("<i", buf, 4)[0]).hex()
    out["create_abc"] = _raw_name(ctx, luo.fd, LIVEUPDATE_IOCTL_CREATE_SESSION, CREATE, b"abc")[0]
    return out


@case("luo")
def case_retrieve_session_names(ctx):
    """luo_session.c luo_session_retrieve does no length check: it strncmp()s
    the name against each incoming session, so with no incoming sessions an
    empty name, a 64-byte name without NUL, an unknown name and the name of
    an *outgoing* session are all -ENOENT (never -EINVAL)."""
    luo = _luo(ctx)
    _session(ctx, luo, "conformance-out")
    retrieve = "struct liveupdate_ioctl_retrieve_session"
    return {
        "empty": _raw_name(ctx, luo.fd, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, retrieve, b"")[0],
        "64_bytes_no_nul": _raw_name(ctx, luo.fd, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, retrieve,
                                     b"N" * LIVEUPDATE_SESSION_NAME_LENGTH)[0],
        "unknown": errno_of(luo.retrieve_session, "conformance-nope"),
        "outgoing_name": errno_of(luo.retrieve_session, "conformance-out"),
    }


@case("luo")
def case_create_session_struct_size(ctx):
    """luo_core.c luo_ioctl: size below offsetofend(name) is -EINVAL;
    copy_struct_from_user: a bigger struct is fine with zeros past the known
    one, -E2BIG with a non-zero byte there."""
    luo = _luo(ctx)
    known = ffi.sizeof(CREATE)
    return {
        "short": _raw_name(ctx, luo.fd, LIVEUPDATE_IOCTL_CREATE_SESSION, CREATE, b"conformance-short",
                           size=known - 1)[0],
        "bigger_zeros": _raw_name(ctx, luo.fd, LIVEUPDATE_IOCTL_CREATE_SESSION, CREATE, b"conformance-big",
                                  size=known + 8, total=known + 8)[0],
        "bigger_nonzero": _raw_name(ctx, luo.fd, LIVEUPDATE_IOCTL_CREATE_SESSION, CREATE, b"conformance-big2",
                                    size=known + 8, total=known + 8, tail=b"\1")[0],
    }


@case("luo")
def case_close_then_create_same_name(ctx):
    """luo_session.c luo_session_release: closing an outgoing session fd
    unpreserves its files and removes it before close() returns, so a CREATE
    of the same name right after is 0 (not -EEXIST), and its memfd can be
    preserved again at once (luo_preserve_file's xa_insert: not -EBUSY)."""
    with LocalFds() as local:
        mem = local(os.memfd_create("conformance", 0))
        luo = _luo(ctx)
        out = {}
        for i in range(3):
            s = luo.create_session("conformance-reuse")
            s.preserve_fd(mem, 1)
            ctx.host.close(s.fd)
            out[f"create_{i}"] = 0
        again = _session(ctx, luo, "conformance-reuse")
        out["preserve_after_close"] = errno_of(again.preserve_fd, mem, 1)
        return out


# --- luo_session.c: session ioctls -------------------------------------------------------------


@case("luo")
def case_session_unknown_ioctls(ctx):
    """luo_session.c luo_session_ioctl: an nr outside the session table (past
    GET_NAME, or below LIVEUPDATE_CMD_SESSION_BASE: a /dev/liveupdate ioctl) is
    -EINVAL; an nr in the table with another encoding is -ENOIOCTLCMD (ENOTTY)."""
    s = _session(ctx, _luo(ctx), "conformance-ioctls")
    past = _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_GET_NAME + 1)
    return {
        "nr_past_the_table": errno_of(ctx.host.ioctl, s.fd, past, bytearray(16)),
        "dev_ioctl_on_session": errno_of(ctx.host.ioctl, s.fd, LIVEUPDATE_IOCTL_CREATE_SESSION,
                                         bytearray(ffi.sizeof(CREATE))),
        "wrong_encoding": errno_of(ctx.host.ioctl, s.fd, LIVEUPDATE_SESSION_PRESERVE_FD | 1 << 30, bytearray(16)),
        "nr": _IOC_NR(past),
    }


@case("luo")
def case_incoming_only_ioctls_on_outgoing(ctx):
    """luo_session.c luo_ioctl_type_valid: RETRIEVE_FD and FINISH are
    LUO_IOCTL_INCOMING (session->retrieved), so on an outgoing session they are
    -EINVAL, checked before the struct size; GET_NAME is LUO_IOCTL_ALL, and a
    non-zero reserved is -EINVAL (luo_session_get_name)."""
    s = _session(ctx, _luo(ctx), "conformance-outgoing")
    retrieve = "struct liveupdate_session_retrieve_fd"
    finish = "struct liveupdate_session_finish"
    return {
        "retrieve_fd": _raw(ctx, s.fd, LIVEUPDATE_SESSION_RETRIEVE_FD, retrieve, token=1)[0],
        "retrieve_fd_size_0": _raw(ctx, s.fd, LIVEUPDATE_SESSION_RETRIEVE_FD, retrieve, size=0)[0],
        "finish": _raw(ctx, s.fd, LIVEUPDATE_SESSION_FINISH, finish)[0],
        "finish_reserved": _raw(ctx, s.fd, LIVEUPDATE_SESSION_FINISH, finish, reserved=1)[0],
        "get_name_reserved": _raw(ctx, s.fd, LIVEUPDATE_SESSION_GET_NAME, "struct liveupdate_session_get_name",
                                  reserved=1)[0],
        "get_name_short": _raw(ctx, s.fd, LIVEUPDATE_SESSION_GET_NAME, "struct liveupdate_session_get_name",
                               size=8)[0],
    }


@case("luo")
def case_preserve_fd_struct_size(ctx):
    """luo_session.c luo_session_ioctl: PRESERVE_FD's size below
    offsetofend(token) is -EINVAL; non-zero bytes past the struct -E2BIG
    (copy_struct_from_user)."""
    with LocalFds() as local:
        mem = local(os.memfd_create("conformance", 0))
        s = _session(ctx, _luo(ctx), "conformance-pfd-size")
        preserve = "struct liveupdate_session_preserve_fd"
        known = ffi.sizeof(preserve)
        short = _raw(ctx, s.fd, LIVEUPDATE_SESSION_PRESERVE_FD, preserve, size=known - 1, fd=mem, token=1)[0]
        arg = new_arg(preserve, fd=mem, token=2)
        arg.size = known + 8
        buf = bytearray(known + 8)
        buf[:known] = ffi.buffer(arg)
        buf[-1] = 1
        big = errno_of(ctx.host.ioctl, s.fd, LIVEUPDATE_SESSION_PRESERVE_FD, buf)
        return {"short": short, "bigger_nonzero": big}


# --- luo_file.c: PRESERVE_FD --------------------------------------------------------------------


@case("luo")
def case_preserve_fd_check_order(ctx):
    """luo_file.c luo_preserve_file checks, in order: the token already used
    in the session (-EEXIST, before the fd is even looked up), fget (-EBADF),
    a handler that takes the file (-ENOENT), the file preserved already
    (xa_insert: -EBUSY)."""
    with LocalFds() as local:
        mem = local(os.memfd_create("conformance", 0))
        r, w = os.pipe()
        local(r), local(w)
        s = _session(ctx, _luo(ctx), "conformance-order")
        s.preserve_fd(mem, 1)
        return {
            "used_token_pipe": errno_of(s.preserve_fd, r, 1),
            "used_token_bad_fd": errno_of(s.preserve_fd, -1, 1),
            "used_token_same_memfd": errno_of(s.preserve_fd, mem, 1),
            "bad_fd": errno_of(s.preserve_fd, -1, 2),
            "pipe": errno_of(s.preserve_fd, r, 2),
            "same_memfd_new_token": errno_of(s.preserve_fd, mem, 2),
        }


@case("luo")
def case_preserve_fd_of_files_no_handler_takes(ctx):
    """luo_file.c luo_preserve_file: a file no handler's can_preserve takes is
    -ENOENT -- a pipe, /dev/null, an eventfd, a regular file on a disk or a
    tmpfs file that still has a name (memfd_luo_can_preserve wants i_nlink 0)."""
    with LocalFds() as local:
        s = _session(ctx, _luo(ctx), "conformance-nohandler")
        r, w = os.pipe()
        local(r), local(w)
        out = {"pipe": errno_of(s.preserve_fd, r, 1),
               "dev_null": errno_of(s.preserve_fd, local(os.open("/dev/null", os.O_RDWR)), 2),
               "eventfd": errno_of(s.preserve_fd, local(os.eventfd(0)), 3),
               "directory": errno_of(s.preserve_fd, local(os.open("/", os.O_RDONLY | os.O_DIRECTORY)), 4)}
        from luvmm.lab.conformance.memfd import tmpfs_dir

        d = tmpfs_dir()
        if d is None:
            out["linked_tmpfs_file"] = "no tmpfs directory"
            return out
        path = f"{d}/conformance-linked-{os.getpid()}"
        fd = local(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            out["linked_tmpfs_file"] = errno_of(s.preserve_fd, fd, 5)
        finally:
            os.unlink(path)
        out["same_file_once_unlinked"] = errno_of(s.preserve_fd, fd, 6)
        return out


# --- what LUO preserves: the file handlers a kernel has ------------------------------------------
# Mainline registers memfd's handler only (mm/memfd_luo.c); the emulated host models the VFIO and
# iommufd live-update series too, so their answers differ by design: declared here, and nowhere else.

SERIES = ("the {} LUO file handler is the out-of-tree live-update series the emulated host models; "
          "mainline has no handler for it, so luo_preserve_file answers ENOENT")


def _preserve_errno(ctx, fd: int) -> int:
    session = _session(ctx, _luo(ctx), "conformance-handlers")
    return errno_of(session.preserve_fd, fd, 0x77)


@case("luo", device=True, out_of_tree=SERIES.format("vfio-pci"))
def case_preserve_fd_of_a_vfio_cdev(ctx):
    """luo_file.c luo_preserve_file: no registered handler's can_preserve()
    takes the file -> -ENOENT (mainline); the series' vfio-pci handler takes
    a VFIO cdev fd."""
    from luvmm.devices.vfio import VfioDevice

    dev = VfioDevice.open_bdf(ctx.host, ctx.device)
    ctx.track(dev.fd)
    return _preserve_errno(ctx, dev.fd)


@case("luo", out_of_tree=SERIES.format("iommufd"))
def case_preserve_fd_of_an_iommufd(ctx):
    """luo_file.c luo_preserve_file: -ENOENT on mainline; the series' iommufd
    handler takes an iommufd."""
    from luvmm.devices.iommufd import IommuFd

    ifd = IommuFd.open(ctx.host)
    ctx.track(ifd.fd)
    return _preserve_errno(ctx, ifd.fd)


@case("luo", out_of_tree="IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE is the series' (provisional number, "
                         "luvmm/uapi/iommufd.py): mainline's iommufd_fops_ioctl has no such command (ENOTTY)")
def case_hwpt_liveupdate_mark_preserve(ctx):
    """drivers/iommu/iommufd/main.c iommufd_fops_ioctl: a number past the
    command table goes to iommufd_vfio_ioctl -> -ENOIOCTLCMD (ENOTTY); with
    the series, HWPT 0 does not exist (ENOENT)."""
    from luvmm.devices.iommufd import IommuFd

    ifd = IommuFd.open(ctx.host)
    ctx.track(ifd.fd)
    return errno_of(ifd.hwpt_liveupdate_mark_preserve, 0, 0x78)
