"""``IommuFd``: a typed handle on /dev/iommu.

Objects inside an iommufd (IOAS, HWPT, device) are named by u32 ids; the
methods return them.  Guest RAM is mapped with :meth:`IommuFd.ioas_map_file`
(a memfd, not a user VA) because that is what makes the mapping preservable
across a live update.
"""

from __future__ import annotations

import errno
import os

from luvmm.abi import ffi, new_arg
from luvmm.host import Host, KernelObject
from luvmm.uapi.iommufd import (
    IOMMU_DESTROY,
    IOMMU_GET_HW_INFO,
    IOMMU_HWPT_ALLOC,
    IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE,
    IOMMU_IOAS_ALLOC,
    IOMMU_IOAS_IOVA_RANGES,
    IOMMU_IOAS_MAP,
    IOMMU_IOAS_MAP_FILE,
    IOMMU_IOAS_MAP_FIXED_IOVA,
    IOMMU_IOAS_MAP_READABLE,
    IOMMU_IOAS_MAP_WRITEABLE,
    IOMMU_IOAS_UNMAP,
)

RW = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE


def _map_flags(iova: int | None, flags: int) -> int:
    return flags | (IOMMU_IOAS_MAP_FIXED_IOVA if iova is not None else 0)


class IommuFd(KernelObject):
    """/dev/iommu."""

    @classmethod
    def open(cls, host: Host, path: str = "/dev/iommu") -> IommuFd:
        return cls(host, host.open(path, os.O_RDWR))

    def ioas_alloc(self) -> int:
        arg = new_arg("struct iommu_ioas_alloc")
        self.ioctl(IOMMU_IOAS_ALLOC, arg)
        return arg.out_ioas_id

    def destroy(self, object_id: int) -> None:
        self.ioctl(IOMMU_DESTROY, new_arg("struct iommu_destroy", id=object_id))

    def ioas_map(self, ioas_id: int, user_va: int, length: int, iova: int | None = None,
                 flags: int = RW) -> int:
        """Map process memory; returns the IOVA (chosen by the kernel unless given)."""
        arg = new_arg("struct iommu_ioas_map", flags=_map_flags(iova, flags), ioas_id=ioas_id,
                      user_va=user_va, length=length, iova=iova or 0)
        self.ioctl(IOMMU_IOAS_MAP, arg)
        return arg.iova

    def ioas_map_file(self, ioas_id: int, fd: int, start: int, length: int, iova: int | None = None,
                      flags: int = RW) -> int:
        """Map ``length`` bytes of file ``fd`` from ``start``; returns the IOVA."""
        arg = new_arg("struct iommu_ioas_map_file", flags=_map_flags(iova, flags), ioas_id=ioas_id,
                      fd=fd, start=start, length=length, iova=iova or 0)
        self.ioctl(IOMMU_IOAS_MAP_FILE, arg)
        return arg.iova

    def ioas_unmap(self, ioas_id: int, iova: int, length: int) -> int:
        """Unmap; returns the number of bytes unmapped (``iova=0, length=2**64-1`` unmaps all)."""
        arg = new_arg("struct iommu_ioas_unmap", ioas_id=ioas_id, iova=iova, length=length)
        self.ioctl(IOMMU_IOAS_UNMAP, arg)
        return arg.length

    def ioas_iova_ranges(self, ioas_id: int) -> tuple[list[tuple[int, int]], int]:
        """The usable IOVA ranges ``[(start, last)]`` and the required alignment.

        The kernel's two-step protocol: ask with room for N ranges; EMSGSIZE
        means there are more (num_iovas says how many), so ask again.
        """
        room = 4
        while True:
            ranges = ffi.new("struct iommu_iova_range[]", room)
            arg = new_arg("struct iommu_ioas_iova_ranges", ioas_id=ioas_id, num_iovas=room,
                          allowed_iovas=int(ffi.cast("uintptr_t", ranges)))
            try:
                self.ioctl(IOMMU_IOAS_IOVA_RANGES, arg)
            except OSError as e:
                if e.errno == errno.EMSGSIZE and arg.num_iovas > room:
                    room = arg.num_iovas
                    continue
                raise
            return [(ranges[i].start, ranges[i].last) for i in range(arg.num_iovas)], arg.out_iova_alignment

    def hwpt_alloc(self, dev_id: int, pt_id: int, flags: int = 0) -> int:
        """Allocate a HWPT (an IOMMU domain) for ``dev_id`` over IOAS ``pt_id``."""
        arg = new_arg("struct iommu_hwpt_alloc", flags=flags, dev_id=dev_id, pt_id=pt_id)
        self.ioctl(IOMMU_HWPT_ALLOC, arg)
        return arg.out_hwpt_id

    def get_hw_info(self, dev_id: int):
        """IOMMU_GET_HW_INFO without type-specific data: out_data_type, capabilities."""
        arg = new_arg("struct iommu_hw_info", dev_id=dev_id)
        self.ioctl(IOMMU_GET_HW_INFO, arg)
        return arg

    def hwpt_liveupdate_mark_preserve(self, hwpt_id: int, token: int) -> None:
        """Mark a HWPT for preservation across a live update (provisional uAPI)."""
        self.ioctl(IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE,
                   new_arg("struct iommu_hwpt_liveupdate_mark_preserve", hwpt_id=hwpt_id, hwpt_token=token))
