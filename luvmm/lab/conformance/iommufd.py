"""iommufd (drivers/iommu/iommufd): conformance cases (luvmm.lab.conformance).

Every errno is the one the cited kernel function returns (Linux 7.2), and
the lab's real kernel confirmed it.  A case asks the kernel for what it
needs (region and IRQ info, IOVA ranges) and never depends on the device
behind the cdev being the emulated DSA or QEMU's edu.
"""

from __future__ import annotations

import fcntl
import mmap
import os

from luvmm.devices.iommufd import IommuFd
from luvmm.devices.vfio import VfioDevice
from luvmm.abi import _IO, ffi, new_arg
from luvmm.lab.conformance import case, errno_of
from luvmm.uapi.iommufd import (
    IOMMU_HWPT_ALLOC,
    IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
    IOMMU_HWPT_ALLOC_NEST_PARENT,
    IOMMU_HWPT_ALLOC_PASID,
    IOMMU_HWPT_DATA_NONE,
    IOMMU_HWPT_DATA_VTD_S1,
    IOMMU_IOAS_ALLOC,
    IOMMU_IOAS_MAP_FIXED_IOVA,
    IOMMU_IOAS_MAP_READABLE,
    IOMMU_IOAS_MAP_WRITEABLE,
    IOMMUFD_CMD_BASE,
    IOMMUFD_TYPE,
)

PAGE = mmap.PAGESIZE
RW = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE
ALL_IOVA = (1 << 64) - 1  # IOAS_UNMAP's "everything" length, and the last u64


def _iommufd(ctx) -> IommuFd:
    ifd = IommuFd.open(ctx.host)
    ctx.track(ifd.fd)
    return ifd


def _bound(ctx) -> tuple[IommuFd, VfioDevice, int]:
    """An iommufd with the context's device bound to it: (iommufd, device, dev_id)."""
    dev = VfioDevice.open_bdf(ctx.host, ctx.device)
    ctx.track(dev.fd)
    ifd = _iommufd(ctx)
    return ifd, dev, dev.bind_iommufd(ifd)


class _Memfd:
    """A local memfd of ``size`` bytes (closed on exit: not a host fd)."""

    def __init__(self, size: int = 4 * PAGE, sealing: bool = True):
        self.fd = os.memfd_create("conformance", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealing else 0))
        os.ftruncate(self.fd, size)

    def seals(self) -> int:
        return fcntl.fcntl(self.fd, fcntl.F_GET_SEALS)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def _unmapped_va(length: int) -> int:
    """A page-aligned user VA with nothing mapped there (mapped, then unmapped)."""
    m = mmap.mmap(-1, length)
    va = ffi.cast("uintptr_t", ffi.from_buffer(m))
    va = int(va)
    m.close()
    return va


# --- IOAS_MAP of a user VA -----------------------------------------------------------------


@case("iommufd", device=True,
      cannot_model="the emulated kernel is another process "
                  "and cannot pin the caller's memory, so where the real kernel pins a user VA "
                  "(HWPT_ALLOC over the IOAS: EFAULT for an unmapped VA) it answers EREMOTE; the VMM "
                  "maps guest RAM with IOAS_MAP_FILE only")
def case_ioas_map_user_va_pins_lazily(ctx):
    """ioas.c iommufd_ioas_map -> iopt_map_user_pages: the pages are not pinned
    while no domain uses the IOAS, so mapping an unmapped VA succeeds; the pin
    happens when a domain is added (hw_pagetable.c iommufd_hwpt_paging_alloc ->
    iopt_table_add_domain -> iopt_fill_domain), which fails with -EFAULT."""
    ifd, _, dev_id = _bound(ctx)
    ioas = ifd.ioas_alloc()
    va = _unmapped_va(2 * PAGE)
    mapped = errno_of(ifd.ioas_map, ioas, va, 2 * PAGE)
    return {"map": mapped, "hwpt_alloc": errno_of(ifd.hwpt_alloc, dev_id, ioas)}


@case("iommufd")
def case_ioas_map_user_va_then_unmap(ctx):
    """ioas.c iommufd_ioas_map then iommufd_ioas_unmap of a user VA with no
    domain attached: nothing is pinned, the area is there and goes (length)."""
    ifd = _iommufd(ctx)
    ioas = ifd.ioas_alloc()
    va = _unmapped_va(2 * PAGE)
    iova = ifd.ioas_map(ioas, va, 2 * PAGE)
    return {"unmapped": ifd.ioas_unmap(ioas, iova, 2 * PAGE)}


# --- IOAS_MAP_FILE ----------------------------------------------------------------------------


@case("iommufd")
def case_ioas_map_file_without_read_or_write(ctx):
    """ioas.c iommufd_ioas_map_file: neither IOMMU_IOAS_MAP_READABLE nor
    _WRITEABLE is -EINVAL (after the flags check, before the IOAS lookup)."""
    ifd = _iommufd(ctx)
    ioas = ifd.ioas_alloc()
    with _Memfd() as m:
        return {"no_flags": errno_of(ifd.ioas_map_file, ioas, m.fd, 0, PAGE, flags=0),
                "fixed_only": errno_of(ifd.ioas_map_file, ioas, m.fd, 0, PAGE, iova=PAGE << 8,
                                       flags=IOMMU_IOAS_MAP_FIXED_IOVA),
                "unknown_ioas_no_flags": errno_of(ifd.ioas_map_file, ioas + 100, m.fd, 0, PAGE, flags=0)}


@case("iommufd")
def case_ioas_map_file_adds_no_seal(ctx):
    """io_pagetable.c iopt_map_file_pages pins the file's folios and takes a
    reference on the file; it never adds a seal to the caller's memfd."""
    ifd = _iommufd(ctx)
    ioas = ifd.ioas_alloc()
    out = {}
    for name, sealing in (("allow_sealing", True), ("no_sealing", False)):
        with _Memfd(sealing=sealing) as m:
            before = m.seals()
            iova = ifd.ioas_map_file(ioas, m.fd, 0, 2 * PAGE)
            mapped = m.seals()
            ifd.ioas_unmap(ioas, iova, 2 * PAGE)
            out[name] = {"before": before, "mapped": mapped, "unmapped": m.seals()}
    return out


@case("iommufd")
def case_ioas_map_file_overlap(ctx):
    """io_pagetable.c iopt_alloc_area_pages -> iopt_reserve_iova: a FIXED_IOVA
    map over an existing area is -EEXIST."""
    ifd = _iommufd(ctx)
    ioas = ifd.ioas_alloc()
    with _Memfd() as m:
        iova = ifd.ioas_map_file(ioas, m.fd, 0, 2 * PAGE, iova=PAGE << 8)
        return {"iova_is_fixed": iova == PAGE << 8,
                "overlap": errno_of(ifd.ioas_map_file, ioas, m.fd, 0, 2 * PAGE, iova=(PAGE << 8) + PAGE)}


@case("iommufd")
def case_ioas_map_file_unknown_flag(ctx):
    """ioas.c iommufd_ioas_map_file: a flag beyond FIXED_IOVA|WRITEABLE|READABLE
    is -EOPNOTSUPP."""
    ifd = _iommufd(ctx)
    ioas = ifd.ioas_alloc()
    with _Memfd() as m:
        return errno_of(ifd.ioas_map_file, ioas, m.fd, 0, PAGE, flags=RW | IOMMU_IOAS_MAP_READABLE << 1)


# --- IOVA ranges and alignment ------------------------------------------------------------------


@case("iommufd")
def case_iova_ranges_of_a_fresh_ioas(ctx):
    """ioas.c iommufd_ioas_iova_ranges: an IOAS no domain or device uses has no
    reserved range -- one range, the whole u64 -- and iopt.iova_alignment 1
    (io_pagetable.c iopt_init_table)."""
    ifd = _iommufd(ctx)
    ranges, alignment = ifd.ioas_iova_ranges(ifd.ioas_alloc())
    return {"ranges": [list(r) for r in ranges], "alignment": alignment}


@case("iommufd", device=True)
def case_iova_alignment_once_a_device_is_attached(ctx):
    """io_pagetable.c iopt_table_add_domain: a domain raises iova_alignment to
    its smallest page size (4 KiB here), and the device's reserved regions
    (the x86 MSI window) leave the usable ranges
    (iopt_table_enforce_dev_resv_regions)."""
    ifd, dev, _ = _bound(ctx)
    ioas = ifd.ioas_alloc()
    dev.attach_pt(ioas)
    ranges, alignment = ifd.ioas_iova_ranges(ioas)
    msi = 0xFEE00000  # the x86 interrupt window (arch/x86/include/asm/apicdef.h APIC_DEFAULT_PHYS_BASE's page)
    return {"alignment": alignment, "starts_at_0": ranges[0][0] == 0,
            "msi_window_usable": any(lo <= msi <= hi for lo, hi in ranges)}


# --- HWPT_ALLOC --------------------------------------------------------------------------------


def _hwpt_alloc_errno(ifd: IommuFd, **fields) -> int:
    arg = new_arg("struct iommu_hwpt_alloc", **fields)
    try:
        ifd.ioctl(IOMMU_HWPT_ALLOC, arg)
    except OSError as e:
        return e.errno
    ifd.destroy(arg.out_hwpt_id)
    return 0


@case("iommufd", device=True)
def case_hwpt_alloc_errors(ctx):
    """hw_pagetable.c iommufd_hwpt_alloc: __reserved -EOPNOTSUPP; data_type NONE
    with a data_len (or a type without one) -EINVAL; an unknown dev_id -ENOENT
    (iommufd_get_device); a pt_id that is no object, or is a device, -EINVAL;
    iommufd_hwpt_paging_alloc: a flag outside the valid ones -EOPNOTSUPP."""
    ifd, _, dev_id = _bound(ctx)
    ioas = ifd.ioas_alloc()
    ok = {"dev_id": dev_id, "pt_id": ioas}
    return {
        "ok": _hwpt_alloc_errno(ifd, **ok),
        "reserved": _hwpt_alloc_errno(ifd, **ok, __reserved=1),
        "data_len_with_type_none": _hwpt_alloc_errno(ifd, **ok, data_type=IOMMU_HWPT_DATA_NONE, data_len=8),
        "type_without_data_len": _hwpt_alloc_errno(ifd, **ok, data_type=IOMMU_HWPT_DATA_VTD_S1),
        "unknown_dev_id": _hwpt_alloc_errno(ifd, dev_id=dev_id + 100, pt_id=ioas),
        "dev_id_is_the_ioas": _hwpt_alloc_errno(ifd, dev_id=ioas, pt_id=ioas),
        "unknown_pt_id": _hwpt_alloc_errno(ifd, dev_id=dev_id, pt_id=ioas + 100),
        "pt_id_is_the_device": _hwpt_alloc_errno(ifd, dev_id=dev_id, pt_id=dev_id),
        "unknown_flag": _hwpt_alloc_errno(ifd, **ok, flags=IOMMU_HWPT_ALLOC_PASID << 1),
    }


@case("iommufd", device=True)
def case_hwpt_alloc_valid_flags(ctx):
    """hw_pagetable.c iommufd_hwpt_paging_alloc: NEST_PARENT and
    DIRTY_TRACKING are valid flags; whether the IOMMU grants them is its
    driver's answer (DIRTY_TRACKING needs IOMMU_CAP_DIRTY_TRACKING, else
    -EOPNOTSUPP; intel-iommu's domain_alloc_paging_flags decides NEST_PARENT)."""
    ifd, _, dev_id = _bound(ctx)
    ioas = ifd.ioas_alloc()
    return {"nest_parent": _hwpt_alloc_errno(ifd, dev_id=dev_id, pt_id=ioas, flags=IOMMU_HWPT_ALLOC_NEST_PARENT),
            "dirty_tracking": _hwpt_alloc_errno(ifd, dev_id=dev_id, pt_id=ioas,
                                                flags=IOMMU_HWPT_ALLOC_DIRTY_TRACKING)}


# --- DESTROY ---------------------------------------------------------------------------------------


@case("iommufd", device=True)
def case_destroy_a_device_id(ctx):
    """main.c iommufd_destroy -> iommufd_object_remove: the bound device's
    object is held by VFIO (users > 1), so -EBUSY."""
    ifd, _, dev_id = _bound(ctx)
    return errno_of(ifd.destroy, dev_id)


@case("iommufd")
def case_destroy_an_unknown_id(ctx):
    """main.c iommufd_object_remove: no object with that id is -ENOENT (id 0 too)."""
    ifd = _iommufd(ctx)
    ioas = ifd.ioas_alloc()
    return {"unknown": errno_of(ifd.destroy, ioas + 100), "zero": errno_of(ifd.destroy, 0),
            "twice": [errno_of(ifd.destroy, ioas), errno_of(ifd.destroy, ioas)]}


@case("iommufd", device=True)
def case_destroy_an_ioas_in_use(ctx):
    """main.c iommufd_object_remove: an IOAS a HWPT holds is -EBUSY; after the
    HWPT is destroyed it goes."""
    ifd, _, dev_id = _bound(ctx)
    ioas = ifd.ioas_alloc()
    hwpt = ifd.hwpt_alloc(dev_id, ioas)
    busy = errno_of(ifd.destroy, ioas)
    return {"ioas_with_hwpt": busy, "hwpt": errno_of(ifd.destroy, hwpt), "ioas_then": errno_of(ifd.destroy, ioas)}


# --- the ioctl frame ---------------------------------------------------------------------------------


@case("iommufd")
def case_unknown_ioctl(ctx):
    """main.c iommufd_fops_ioctl: a number below IOMMUFD_CMD_BASE goes to
    vfio_compat.c iommufd_vfio_ioctl, which does not know it: -ENOIOCTLCMD,
    which the syscall reports as -ENOTTY."""
    ifd = _iommufd(ctx)
    return errno_of(ctx.host.ioctl, ifd.fd, _IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE - 1), bytearray(64))


@case("iommufd")
def case_struct_size(ctx):
    """main.c iommufd_fops_ioctl: size below the op's min_size (offsetofend of
    out_ioas_id for IOAS_ALLOC) is -EINVAL; copy_struct_from_user: non-zero
    bytes past the struct the kernel knows are -E2BIG, zero ones are fine."""
    ifd = _iommufd(ctx)
    known = ffi.sizeof("struct iommu_ioas_alloc")

    def alloc(size: int, tail: bytes = b"") -> int:
        buf = bytearray(ffi.buffer(new_arg("struct iommu_ioas_alloc"))) + bytearray(tail)
        buf[:4] = size.to_bytes(4, "little")
        return errno_of(ctx.host.ioctl, ifd.fd, IOMMU_IOAS_ALLOC, buf)

    return {"too_small": alloc(known - 4), "size_zero": alloc(0), "exact": alloc(known),
            "bigger_zeroed": alloc(known + 8, bytes(8)), "bigger_nonzero": alloc(known + 8, b"\x01" + bytes(7))}


@case("iommufd")
def case_ioas_alloc_with_flags(ctx):
    """ioas.c iommufd_ioas_alloc_ioctl: any flag is -EOPNOTSUPP."""
    ifd = _iommufd(ctx)
    arg = new_arg("struct iommu_ioas_alloc", flags=1)
    return errno_of(ifd.ioctl, IOMMU_IOAS_ALLOC, arg)


@case("iommufd")
def case_ioas_unmap_not_mapped(ctx):
    """ioas.c iommufd_ioas_unmap: a range with no area unmaps nothing: -ENOENT;
    io_pagetable.c iopt_unmap_iova_range: a range that cuts an area is -ENOENT;
    unmap-all of an empty IOAS succeeds with length 0; an unknown IOAS -ENOENT."""
    ifd = _iommufd(ctx)
    ioas = ifd.ioas_alloc()
    with _Memfd() as m:
        iova = ifd.ioas_map_file(ioas, m.fd, 0, 2 * PAGE, iova=PAGE << 8)
        out = {"nothing_there": errno_of(ifd.ioas_unmap, ioas, PAGE << 12, PAGE),
               "cuts_an_area": errno_of(ifd.ioas_unmap, ioas, iova, PAGE),
               "unknown_ioas": errno_of(ifd.ioas_unmap, ioas + 100, iova, 2 * PAGE),
               "whole_area": ifd.ioas_unmap(ioas, iova, 2 * PAGE)}
    out["all_of_empty"] = ifd.ioas_unmap(ioas, 0, ALL_IOVA)
    return out


@case("iommufd")
def case_iova_ranges_unknown_ioas(ctx):
    """ioas.c iommufd_ioas_iova_ranges -> iommufd_get_ioas: an unknown id is -ENOENT."""
    ifd = _iommufd(ctx)
    return errno_of(ifd.ioas_iova_ranges, ifd.ioas_alloc() + 100)
