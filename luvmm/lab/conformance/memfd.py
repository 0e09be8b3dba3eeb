"""memfd preservation (mm/memfd_luo.c): conformance cases (luvmm.lab.conformance).

memfd_luo_can_preserve takes any unlinked shmem file (``shmem_file(file) &&
!inode->i_nlink``); memfd_luo_preserve refuses seals outside
MEMFD_LUO_ALL_SEALS (every seal Linux defines, F_SEAL_EXEC included) and
freezes the mapping (shmem_freeze: SHMEM_F_MAPPING_FROZEN) until
memfd_luo_unpreserve, without adding a seal.
"""

from __future__ import annotations

import errno
import fcntl
import os

from luvmm.liveupdate.luo import LiveUpdate
from luvmm.lab.conformance import LocalFds, case, errno_of

F_SEAL_EXEC = getattr(fcntl, "F_SEAL_EXEC", 0x20)  # include/uapi/linux/fcntl.h
MFD_NOEXEC_SEAL = getattr(os, "MFD_NOEXEC_SEAL", 0x8)  # include/uapi/linux/memfd.h
TMPFS_DIRS = ("/dev/shm", "/tmp", "/run")

#: Why the emulated host cannot give the real kernel's answers on a frozen memfd.
NOT_ENFORCEABLE = (
    "the memfd is a file of the host's own kernel that the emulated kernel only shares (passed over its "
    "socket): memfd_luo_preserve's shmem_freeze() sets SHMEM_F_MAPPING_FROZEN on the inode, which no "
    "userspace process can set, and a seal (the only other way to refuse another process's resize) would "
    "be visible to the caller and could not be taken off at unpreserve; so ftruncate to a new size, a "
    "write past EOF and fallocate succeed on the emulated host (a size change is caught at the reboot "
    "instead: the freeze fails EBUSY)")

def _session(ctx, name: str):
    luo = LiveUpdate.open(ctx.host)
    ctx.track(luo.fd)
    s = luo.create_session(name)
    ctx.track(s.fd)
    return s


TMPFS_MAGIC = 0x01021994  # include/uapi/linux/magic.h


def _fs_type(fd: int) -> int:
    """fstatfs(fd).f_type (struct statfs starts with it)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = ctypes.create_string_buffer(256)
    if libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def tmpfs_dir() -> str | None:
    """A tmpfs directory to make O_TMPFILE files in."""
    for d in TMPFS_DIRS:
        try:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            if _fs_type(fd) == TMPFS_MAGIC:
                return d
        finally:
            os.close(fd)
    return None


def _seals(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GET_SEALS)


def _frozen_probe(fd: int, size: int) -> dict:
    """What the calls shmem_freeze() governs say on ``fd`` (of ``size`` bytes);
    every change is undone where it succeeded."""
    out = {"ftruncate_grow": errno_of(os.ftruncate, fd, size + 4096)}
    if not out["ftruncate_grow"]:
        os.ftruncate(fd, size)
    out["ftruncate_shrink"] = errno_of(os.ftruncate, fd, size - 1)
    if not out["ftruncate_shrink"]:
        os.ftruncate(fd, size)
    out["ftruncate_same_size"] = errno_of(os.ftruncate, fd, size)
    out["write_past_eof"] = errno_of(os.pwrite, fd, b"x", size)
    if not out["write_past_eof"]:
        os.ftruncate(fd, size)
    out["fallocate_inside"] = errno_of(os.posix_fallocate, fd, 0, size)
    out["fallocate_past_eof"] = errno_of(os.posix_fallocate, fd, size, 4096)
    if not out["fallocate_past_eof"]:
        os.ftruncate(fd, size)
    out["write_inside"] = errno_of(os.pwrite, fd, b"y", 0)
    out["size"] = os.fstat(fd).st_size
    return out


@case("memfd")
def case_preserve_kinds_of_shmem_file(ctx):
    """memfd_luo.c memfd_luo_can_preserve: any unlinked shmem file -- a memfd
    without sealing, with MFD_ALLOW_SEALING, with MFD_NOEXEC_SEAL (which sets
    F_SEAL_EXEC), an O_TMPFILE file of a tmpfs; memfd_luo_preserve: F_SEAL_EXEC
    is in MEMFD_LUO_ALL_SEALS, and so is every seal, F_SEAL_SEAL included."""
    with LocalFds() as local:
        s = _session(ctx, "conformance-kinds")
        out = {"plain": errno_of(s.preserve_fd, local(os.memfd_create("c-plain", 0)), 1),
               "allow_sealing": errno_of(s.preserve_fd, local(os.memfd_create("c-seal", os.MFD_ALLOW_SEALING)), 2)}
        noexec = local(os.memfd_create("c-noexec", MFD_NOEXEC_SEAL))
        out["noexec_seal_has_seal_exec"] = bool(_seals(noexec) & F_SEAL_EXEC)
        out["noexec_seal"] = errno_of(s.preserve_fd, noexec, 3)
        exec_sealed = local(os.memfd_create("c-exec", os.MFD_ALLOW_SEALING))
        fcntl.fcntl(exec_sealed, fcntl.F_ADD_SEALS, F_SEAL_EXEC)
        out["seal_exec"] = errno_of(s.preserve_fd, exec_sealed, 4)
        every = local(os.memfd_create("c-every", os.MFD_ALLOW_SEALING))
        os.ftruncate(every, 4096)
        fcntl.fcntl(every, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
                    | getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10) | F_SEAL_EXEC | fcntl.F_SEAL_SEAL)
        out["every_seal"] = errno_of(s.preserve_fd, every, 5)
        d = tmpfs_dir()
        if d is not None:
            tmp = local(os.open(d, os.O_TMPFILE | os.O_RDWR, 0o600))
            os.write(tmp, b"tmpfile")
            out["o_tmpfile_on_tmpfs"] = errno_of(s.preserve_fd, tmp, 6)
        else:
            out["o_tmpfile_on_tmpfs"] = "no tmpfs directory"
        out["empty_memfd"] = errno_of(s.preserve_fd, local(os.memfd_create("c-empty", 0)), 7)
        return out


@case("memfd")
def case_preserve_adds_no_seal(ctx):
    """memfd_luo.c memfd_luo_preserve: the freeze is the inode flag
    SHMEM_F_MAPPING_FROZEN (shmem_freeze), not a seal -- F_GET_SEALS of the
    caller's memfd is the same before and after PRESERVE_FD, and after the
    session is closed (memfd_luo_unpreserve)."""
    with LocalFds() as local:
        s = _session(ctx, "conformance-noseal")
        mem = local(os.memfd_create("c-noseal", os.MFD_ALLOW_SEALING))
        os.ftruncate(mem, 8192)
        before = _seals(mem)
        s.preserve_fd(mem, 1)
        during = _seals(mem)
        ctx.host.close(s.fd)
        return {"before": before, "during": during, "after_unpreserve": _seals(mem)}


@case("memfd", cannot_model=NOT_ENFORCEABLE)
def case_preserved_memfd_is_frozen(ctx):
    """mm/shmem.c, while SHMEM_F_MAPPING_FROZEN is set (memfd_luo_preserve ->
    shmem_freeze): shmem_setattr refuses a new size (-EPERM; the same size is
    fine), shmem_write_begin a write past EOF (-EPERM; inside the file is
    fine), shmem_fallocate any fallocate (-EPERM).  The emulated host cannot
    enforce this (see NOT_ENFORCEABLE): its result says so."""
    with LocalFds() as local:
        s = _session(ctx, "conformance-frozen")
        mem = local(os.memfd_create("c-frozen", 0))
        os.ftruncate(mem, 8192)
        s.preserve_fd(mem, 1)
        out = _frozen_probe(mem, 8192)
        if ctx.side == "emulated":
            out["not_enforced"] = "SHMEM_F_MAPPING_FROZEN cannot be set on the host's memfd by the emulator"
        return out


@case("memfd")
def case_preserved_memfd_inside_the_size(ctx):
    """mm/shmem.c: the freeze only stops size changes -- a write inside the
    file (shmem_write_begin with pos + len <= i_size) and ftruncate to the same
    size (shmem_setattr, newsize == oldsize) still succeed while preserved."""
    with LocalFds() as local:
        s = _session(ctx, "conformance-inside")
        mem = local(os.memfd_create("c-inside", 0))
        os.ftruncate(mem, 8192)
        s.preserve_fd(mem, 1)
        return {"write_inside": errno_of(os.pwrite, mem, b"inside", 100),
                "ftruncate_same_size": errno_of(os.ftruncate, mem, 8192),
                "read_back": os.pread(mem, 6, 100).decode(), "size": os.fstat(mem).st_size}


@case("memfd")
def case_freeze_ends_at_unpreserve(ctx):
    """memfd_luo.c memfd_luo_unpreserve: shmem_freeze(inode, false) -- once
    the session is closed (luo_session_release -> luo_file_unpreserve_files),
    ftruncate, writes past EOF and fallocate work again."""
    with LocalFds() as local:
        s = _session(ctx, "conformance-thaw")
        mem = local(os.memfd_create("c-thaw", 0))
        os.ftruncate(mem, 8192)
        s.preserve_fd(mem, 1)
        ctx.host.close(s.fd)
        return _frozen_probe(mem, 8192)


@case("memfd")
def case_preserve_the_same_inode_twice(ctx):
    """memfd_luo.c memfd_luo_get_id is the inode: another open file of the same
    memfd (open of /proc/self/fd/N) is the same file to LUO -- -EBUSY in
    luo_preserve_file (xa_insert), in the same session and in another."""
    with LocalFds() as local:
        luo = LiveUpdate.open(ctx.host)
        ctx.track(luo.fd)
        a = luo.create_session("conformance-inode-a")
        ctx.track(a.fd)
        b = luo.create_session("conformance-inode-b")
        ctx.track(b.fd)
        mem = local(os.memfd_create("c-inode", 0))
        a.preserve_fd(mem, 1)
        other = local(os.open(f"/proc/self/fd/{mem}", os.O_RDWR))
        return {"reopened_same_session": errno_of(a.preserve_fd, other, 2),
                "reopened_other_session": errno_of(b.preserve_fd, other, 1),
                "dup_other_session": errno_of(b.preserve_fd, local(os.dup(mem)), 2),
                "same_inode": os.fstat(other).st_ino == os.fstat(mem).st_ino}


@case("memfd")
def case_hugetlb_memfd_has_no_handler(ctx):
    """memfd_luo.c memfd_luo_can_preserve: a hugetlb memfd is not a shmem file
    (hugetlbfs) -- no handler, -ENOENT (luo_preserve_file)."""
    with LocalFds() as local:
        try:
            mem = local(os.memfd_create("c-huge", os.MFD_HUGETLB))
        except OSError as e:
            return {"memfd_create": errno.errorcode.get(e.errno, e.errno)}
        s = _session(ctx, "conformance-huge")
        return {"preserve": errno_of(s.preserve_fd, mem, 1)}
