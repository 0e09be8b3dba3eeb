"""memfd preservation (mm/memfd_luo.c): contents, size and position survive
the kexec; seals beyond what LUO knows are EOPNOTSUPP.

memfd_luo_can_preserve takes any *unlinked shmem file*: ``shmem_file(file) &&
!inode->i_nlink`` -- a memfd of any flags (MFD_NOEXEC_SEAL, F_SEAL_EXEC, no
sealing at all) and an O_TMPFILE file of a tmpfs (/dev/shm) alike; a hugetlb
memfd (hugetlbfs), a linked tmpfs file, a pipe, /dev/null have no handler
(ENOENT, luo_preserve_file).

The pages are the machine's: preserving hands the memfd's pages to the
machine (the same pages the IOMMU translates to, when the memfd is guest
RAM), and the next kernel hands out a new fd on those very pages.

What the emulation cannot do: memfd_luo_preserve freezes the mapping with
shmem_freeze() (SHMEM_F_MAPPING_FROZEN), so that until unpreserve a size
change (shmem_setattr), a write past EOF (shmem_write_begin) and any
fallocate (shmem_fallocate) are EPERM -- without adding a seal.  The file is
the host kernel's, shared with the caller; no userspace process can set that
inode flag, and seals (the only other way to refuse a resize to another
process) would be visible to the caller and could never be taken off at
unpreserve.  So the emulated host adds nothing to the caller's file: those
calls succeed here, and a size change is caught at the reboot instead (the
freeze fails EBUSY, the kexec does not happen).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os

from luvmm.liveupdate.emu.kernel.core import KernelError, RealFile
from luvmm.liveupdate.emu.kernel.luo import FileHandler, LuoFile, register_file_handler

# include/linux/kho/abi/memfd.h (Linux 7.2): every seal Linux defines, F_SEAL_EXEC
# included -- the lab kernel preserves an exec-sealed memfd (tests/lab/test_lab_luo_rules.py).
MEMFD_LUO_ALL_SEALS = (fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
                       | getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10) | getattr(fcntl, "F_SEAL_EXEC", 0x20))

# include/uapi/linux/magic.h
TMPFS_MAGIC = 0x01021994

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def fs_type(fd: int) -> int:
    """fstatfs(fd).f_type (struct statfs starts with the __fsword_t f_type)."""
    buf = ctypes.create_string_buffer(256)
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def is_memfd(fd: int) -> bool:
    """A memfd_create() file (what IOMMU_IOAS_MAP_FILE takes)."""
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
        fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False
    return link.startswith("/memfd:")


def is_shmem_unlinked(fd: int) -> bool:
    """memfd_luo_can_preserve: shmem_file(file) && !inode->i_nlink.  A memfd
    and an O_TMPFILE/unlinked file of a tmpfs are shmem files; hugetlbfs is
    not."""
    try:
        st = os.fstat(fd)
        return fs_type(fd) == TMPFS_MAGIC and st.st_nlink == 0 and (st.st_mode & 0o170000) == 0o100000
    except OSError:
        return False


class MemfdHandler(FileHandler):
    compatible = "memfd-v1"

    def can_preserve(self, target) -> bool:
        return isinstance(target, RealFile) and is_shmem_unlinked(target.fd)

    def preserve(self, lf: LuoFile) -> dict:
        fd = lf.target.fd
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:  # a tmpfs file that is not a memfd: memfd_get_seals gives F_SEAL_SEAL
            seals = fcntl.F_SEAL_SEAL
        if seals & ~MEMFD_LUO_ALL_SEALS:
            raise KernelError(errno.EOPNOTSUPP, "memfd has seals LUO does not know")
        size = os.fstat(fd).st_size
        # No seal is added (the kernel's freeze is an inode flag, which the
        # emulation cannot set on the host's file: see the module's doc).
        dev, inode = self.kernel.machine.hold(fd)
        return {"size": size, "pos": os.lseek(fd, 0, os.SEEK_CUR), "seals": seals, "inode": inode, "dev": dev}

    def freeze(self, lf: LuoFile) -> dict:
        fd = lf.target.fd
        if os.fstat(fd).st_size != lf.state["size"]:
            raise KernelError(errno.EBUSY, "a preserved memfd changed size")
        return dict(lf.state, pos=os.lseek(fd, 0, os.SEEK_CUR))

    def hardware(self, state: dict):
        return set(), set(), {(state["dev"], state["inode"])}

    def _pages(self, lf: LuoFile) -> int | None:
        return self.kernel.machine.pages((lf.state["dev"], lf.state["inode"]))

    def restore(self, lf: LuoFile) -> None:
        if self._pages(lf) is None:
            lf.retrieve_status = -errno.EIO

    def retrieve(self, lf: LuoFile) -> int:
        pages = self._pages(lf)
        if pages is None:
            raise KernelError(errno.EIO, "preserved memory is gone")
        fd = os.dup(pages)
        os.lseek(fd, lf.state["pos"], os.SEEK_SET)
        return fd


register_file_handler(MemfdHandler)
