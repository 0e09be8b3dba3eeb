"""``VfioDevice``: a typed handle on a VFIO device cdev (/dev/vfio/devices/vfioN).

The iommufd-era flow, as the kernel's VFIO selftests use it::

    dev = VfioDevice.open_bdf(host, "0000:6a:01.0")   # sysfs -> vfioN
    devid = dev.bind_iommufd(iommufd)                 # VFIO_DEVICE_BIND_IOMMUFD
    dev.attach_pt(hwpt_or_ioas_id)                    # VFIO_DEVICE_ATTACH_IOMMUFD_PT
    dev.enable_msix([eventfd, ...])                   # VFIO_DEVICE_SET_IRQS
    dev.region_write(VFIO_PCI_BAR0_REGION_INDEX, off, data)
"""

from __future__ import annotations

import errno
import os
import struct

from luvmm.abi import ffi, new_arg
from luvmm.host import Host, KernelObject
from luvmm.uapi.vfio import (
    VFIO_DEVICE_ATTACH_IOMMUFD_PT,
    VFIO_DEVICE_BIND_IOMMUFD,
    VFIO_DEVICE_DETACH_IOMMUFD_PT,
    VFIO_DEVICE_GET_INFO,
    VFIO_DEVICE_GET_IRQ_INFO,
    VFIO_DEVICE_GET_REGION_INFO,
    VFIO_DEVICE_RESET,
    VFIO_DEVICE_SET_IRQS,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_REGION_INFO_CAP_MSIX_MAPPABLE,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    VFIO_REGION_INFO_FLAG_CAPS,
    VFIO_REGION_INFO_FLAG_MMAP,
)

VFIO_CDEV_DIR = "/dev/vfio/devices"
PCI_DEVICES_DIR = "/sys/bus/pci/devices"


def is_bdf(bdf: str) -> bool:
    """``DDDD:BB:DD.F`` in hex, as sysfs names PCI functions (no regex: the
    restore path imports this module)."""
    hexdigits = "0123456789abcdefABCDEF"
    return (isinstance(bdf, str) and len(bdf) == 12 and bdf[4] == ":" and bdf[7] == ":" and bdf[10] == "."
            and all(c in hexdigits for c in bdf[:4] + bdf[5:7] + bdf[8:10]) and bdf[11] in "01234567")


def vfio_functions(host) -> list[str]:
    """The PCI functions bound to vfio-pci that ``host`` shows (sorted BDFs)."""
    found = []
    try:
        bdfs = host.listdir(PCI_DEVICES_DIR)
    except OSError:
        return []
    for bdf in bdfs:
        try:
            if host.listdir(f"{PCI_DEVICES_DIR}/{bdf}/vfio-dev"):
                found.append(bdf)
        except OSError:
            continue
    return sorted(found)


def cdev_path_for_bdf(host: Host, bdf: str) -> str:
    """The cdev of a PCI function bound to vfio-pci, found the sysfs way:
    /sys/bus/pci/devices/<BDF>/vfio-dev/vfioN -> /dev/vfio/devices/vfioN."""
    if not is_bdf(bdf):
        raise OSError(errno.EINVAL, f"{bdf!r} is not a PCI address (DDDD:BB:DD.F)")
    entries = [e for e in host.listdir(f"{PCI_DEVICES_DIR}/{bdf}/vfio-dev") if e.startswith("vfio")]
    if len(entries) != 1:
        raise OSError(errno.ENOENT, f"{bdf} has {len(entries)} vfio-dev entries (is it bound to vfio-pci?)")
    return f"{VFIO_CDEV_DIR}/{entries[0]}"


class RegionInfo:
    """What VFIO_DEVICE_GET_REGION_INFO says of a region, its capability
    chain read: where it is in the device fd (``offset``), its ``size`` and
    ``flags``, and what may be mmapped of it -- ``mmap_areas``, (offset,
    size) pairs inside the region: the VFIO_REGION_INFO_CAP_SPARSE_MMAP
    areas where the kernel lists them, else all of it where it says
    VFIO_REGION_INFO_FLAG_MMAP, else none.  ``msix_mappable``:
    VFIO_REGION_INFO_CAP_MSIX_MAPPABLE (the MSI-X table in it may be mapped
    too; a VMM that virtualises the table traps it anyway)."""

    __slots__ = ("index", "flags", "size", "offset", "mmap_areas", "msix_mappable")

    def __init__(self, index: int, flags: int, size: int, offset: int, mmap_areas: list[tuple[int, int]],
                 msix_mappable: bool = False):
        self.index, self.flags, self.size, self.offset = index, flags, size, offset
        self.mmap_areas, self.msix_mappable = mmap_areas, msix_mappable

    @property
    def mmap(self) -> bool:
        return bool(self.flags & VFIO_REGION_INFO_FLAG_MMAP)

    def __repr__(self) -> str:
        return (f"RegionInfo(index={self.index}, flags={self.flags:#x}, size={self.size:#x}, "
                f"offset={self.offset:#x}, mmap_areas={[(hex(o), hex(s)) for o, s in self.mmap_areas]})")


def parse_region_caps(info: RegionInfo, buf: bytes, cap_offset: int) -> None:
    """Walk the capability chain of a VFIO_DEVICE_GET_REGION_INFO answer
    (``buf``: the whole argsz bytes), as include/uapi/linux/vfio.h lays it
    out: each struct vfio_info_cap_header names the next by its offset from
    the start of the struct, 0 ending the chain."""
    header = ffi.sizeof("struct vfio_info_cap_header")
    sparse_fixed = ffi.sizeof("struct vfio_region_info_cap_sparse_mmap")
    area = ffi.sizeof("struct vfio_region_sparse_mmap_area")
    seen = set()
    offset = cap_offset
    while offset and offset not in seen and offset + header <= len(buf):
        seen.add(offset)
        cap_id, _version, nxt = struct.unpack_from("=HHI", buf, offset)
        if cap_id == VFIO_REGION_INFO_CAP_SPARSE_MMAP and offset + sparse_fixed <= len(buf):
            (count,) = struct.unpack_from("=I", buf, offset + header)
            count = min(count, (len(buf) - offset - sparse_fixed) // area)
            info.mmap_areas = [struct.unpack_from("=QQ", buf, offset + sparse_fixed + i * area)
                               for i in range(count)]
            info.mmap_areas = [(o, s) for o, s in info.mmap_areas if s and o + s <= info.size]
        elif cap_id == VFIO_REGION_INFO_CAP_MSIX_MAPPABLE:
            info.msix_mappable = True
        offset = nxt


class VfioDevice(KernelObject):
    """A VFIO device cdev fd."""

    def __init__(self, host: Host, fd: int, path: str | None = None):
        super().__init__(host, fd)
        self.path = path
        self._regions: dict[int, tuple[int, int]] = {}  # index -> (offset, size)

    @classmethod
    def open(cls, host: Host, path: str) -> VfioDevice:
        return cls(host, host.open(path, os.O_RDWR), path)

    @classmethod
    def open_bdf(cls, host: Host, bdf: str) -> VfioDevice:
        return cls.open(host, cdev_path_for_bdf(host, bdf))

    # --- information --------------------------------------------------------------

    def get_info(self):
        info = new_arg("struct vfio_device_info")
        self.ioctl(VFIO_DEVICE_GET_INFO, info)
        return info

    def get_region_info(self, index: int):
        info = new_arg("struct vfio_region_info", index=index)
        self.ioctl(VFIO_DEVICE_GET_REGION_INFO, info)
        self._regions[index] = (info.offset, info.size)
        return info

    def region_info(self, index: int) -> RegionInfo:
        """VFIO_DEVICE_GET_REGION_INFO with its capabilities: asked once with
        the bare struct; where the kernel says VFIO_REGION_INFO_FLAG_CAPS and
        needs a larger argsz (it reports how much), asked again with that."""
        info = self.get_region_info(index)
        region = RegionInfo(index, info.flags, info.size, info.offset,
                            [(0, info.size)] if info.flags & VFIO_REGION_INFO_FLAG_MMAP and info.size else [])
        base = ffi.sizeof("struct vfio_region_info")
        if info.flags & VFIO_REGION_INFO_FLAG_CAPS and info.argsz > base:
            buf = bytearray(info.argsz)
            struct.pack_into("=III", buf, 0, info.argsz, 0, index)
            self.host.ioctl(self.fd, VFIO_DEVICE_GET_REGION_INFO, buf)
            flags, _, cap_offset = struct.unpack_from("=III", buf, 4)
            if flags & VFIO_REGION_INFO_FLAG_CAPS and cap_offset:
                parse_region_caps(region, bytes(buf), cap_offset)
        return region

    def get_irq_info(self, index: int):
        info = new_arg("struct vfio_irq_info", index=index)
        self.ioctl(VFIO_DEVICE_GET_IRQ_INFO, info)
        return info

    # --- interrupts -----------------------------------------------------------------

    def set_irqs(self, index: int, flags: int, start: int, count: int, data: bytes = b"") -> None:
        """VFIO_DEVICE_SET_IRQS with ``data`` appended to the struct."""
        size = ffi.sizeof("struct vfio_irq_set")
        buf = bytearray(size + len(data))
        struct.pack_into("=5I", buf, 0, len(buf), flags, index, start, count)
        buf[size:] = data
        self.host.ioctl(self.fd, VFIO_DEVICE_SET_IRQS, buf)

    def enable_msix(self, eventfds: list[int], start: int = 0) -> None:
        """Route MSI-X vectors ``start..`` to ``eventfds`` (-1 leaves a vector unset)."""
        self.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                      start, len(eventfds), struct.pack(f"={len(eventfds)}i", *eventfds))

    def disable_irqs(self, index: int = VFIO_PCI_MSIX_IRQ_INDEX) -> None:
        """DATA_NONE | ACTION_TRIGGER with count 0: tear down every vector of ``index``."""
        self.set_irqs(index, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0)

    # --- state ----------------------------------------------------------------------------

    def reset(self) -> None:
        self.ioctl(VFIO_DEVICE_RESET)

    def bind_iommufd(self, iommufd: int | KernelObject) -> int:
        """Bind to an iommufd; returns the device id iommufd knows it by."""
        fd = iommufd.fileno() if isinstance(iommufd, KernelObject) else iommufd
        bind = new_arg("struct vfio_device_bind_iommufd", iommufd=fd)
        self.ioctl(VFIO_DEVICE_BIND_IOMMUFD, bind)
        return bind.out_devid

    def attach_pt(self, pt_id: int) -> int:
        """Attach to an IOAS or HWPT; returns the pt_id the kernel used (an
        IOAS attach auto-allocates a HWPT and reports its id)."""
        attach = new_arg("struct vfio_device_attach_iommufd_pt", pt_id=pt_id)
        self.ioctl(VFIO_DEVICE_ATTACH_IOMMUFD_PT, attach)
        return attach.pt_id

    def detach_pt(self) -> None:
        self.ioctl(VFIO_DEVICE_DETACH_IOMMUFD_PT, new_arg("struct vfio_device_detach_iommufd_pt"))

    # --- regions ---------------------------------------------------------------------------

    def _region(self, index: int) -> tuple[int, int]:
        if index not in self._regions:
            self.get_region_info(index)
        return self._regions[index]

    def region_read(self, index: int, offset: int, length: int) -> bytes:
        base, size = self._region(index)
        if offset < 0 or offset + length > size:
            raise ValueError(f"region {index}: [{offset:#x}, +{length}) outside its {size:#x} bytes")
        return self.host.pread(self.fd, length, base + offset)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        base, size = self._region(index)
        if offset < 0 or offset + len(data) > size:
            raise ValueError(f"region {index}: [{offset:#x}, +{len(data)}) outside its {size:#x} bytes")
        written = self.host.pwrite(self.fd, data, base + offset)
        if written != len(data):
            raise OSError(errno.EIO, f"short region write: {written} of {len(data)} bytes")

    def read32(self, index: int, offset: int) -> int:
        return struct.unpack("<I", self.region_read(index, offset, 4))[0]

    def write32(self, index: int, offset: int, value: int) -> None:
        self.region_write(index, offset, struct.pack("<I", value))

    def read64(self, index: int, offset: int) -> int:
        return struct.unpack("<Q", self.region_read(index, offset, 8))[0]

    def write64(self, index: int, offset: int, value: int) -> None:
        self.region_write(index, offset, struct.pack("<Q", value))

    def config_read(self, offset: int, length: int) -> bytes:
        return self.region_read(VFIO_PCI_CONFIG_REGION_INDEX, offset, length)

    def config_write(self, offset: int, data: bytes) -> None:
        self.region_write(VFIO_PCI_CONFIG_REGION_INDEX, offset, data)
