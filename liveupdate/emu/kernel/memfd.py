"""memfd preservation (mm/memfd_luo.c): contents, size and position survive
the kexec; the size is frozen from PRESERVE_FD on; hugetlb memfds have no
handler (ENOENT); seals beyond what LUO knows are EOPNOTSUPP.

The pages are the machine's: preserving hands the memfd's pages to the
machine (the same pages the IOMMU translates to, when the memfd is guest
RAM), and the next kernel hands out a new fd on those very pages.  The kernel freezes the size with an inode
flag; the emulation adds F_SEAL_GROW | F_SEAL_SHRINK when it still can, and
otherwise checks at freeze that the size did not change (EBUSY).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

from liveupdate.emu.kernel.core import KernelError, RealFile
from liveupdate.emu.kernel.luo import FileHandler, LuoFile, register_file_handler

# include/linux/kho/abi/memfd.h (Linux 7.2): every seal Linux defines, F_SEAL_EXEC
# included -- the lab kernel preserves an exec-sealed memfd (tests/lab/test_lab_luo_rules.py).
MEMFD_LUO_ALL_SEALS = (fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
                       | getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10) | getattr(fcntl, "F_SEAL_EXEC", 0x20))


def is_memfd(fd: int) -> bool:
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
        fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False
    return link.startswith("/memfd:")


class MemfdHandler(FileHandler):
    compatible = "memfd-v1"

    def can_preserve(self, target) -> bool:
        if not isinstance(target, RealFile) or not is_memfd(target.fd):
            return False
        return os.fstat(target.fd).st_blksize <= mmap.PAGESIZE  # hugetlb: no handler

    def preserve(self, lf: LuoFile) -> dict:
        fd = lf.target.fd
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if seals & ~MEMFD_LUO_ALL_SEALS:
            raise KernelError(errno.EOPNOTSUPP, "memfd has seals LUO does not know")
        size = os.fstat(fd).st_size
        if not seals & fcntl.F_SEAL_SEAL:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
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
