"""Typed handles put the kernel's bytes in the kernel's places.

A scripted Host stands in for the kernel: it records each ioctl's request and
struct bytes and answers like the kernel would (fills out-fields or fails with
an errno).  This is how a handle is checked without the hardware.
"""

import errno
import struct

import pytest

from luvmm.abi import ffi
from luvmm.host import Host, ioctl_error
from luvmm.devices.iommufd import IommuFd
from luvmm.uapi.iommufd import (
    IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE,
    IOMMU_IOAS_ALLOC,
    IOMMU_IOAS_IOVA_RANGES,
    IOMMU_IOAS_MAP_FILE,
    IOMMU_IOAS_MAP_FIXED_IOVA,
    IOMMU_IOAS_MAP_READABLE,
    IOMMU_IOAS_MAP_WRITEABLE,
)
from luvmm.devices.vfio import VfioDevice
from luvmm.uapi.vfio import (
    VFIO_DEVICE_BIND_IOMMUFD,
    VFIO_DEVICE_GET_REGION_INFO,
    VFIO_DEVICE_SET_IRQS,
    VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
)
from luvmm.liveupdate.luo import LiveUpdate
from luvmm.uapi.luo import LIVEUPDATE_IOCTL_CREATE_SESSION, LIVEUPDATE_SESSION_PRESERVE_FD


class ScriptedHost(Host):
    kind = "scripted"

    def __init__(self, answers=None, dirs=None):
        self.calls = []
        self.answers = answers or {}
        self.dirs = dirs or {}
        self.opened = []
        self.preads = []

    def _ioctl(self, fd, request, arg, definition):
        data = bytes(memoryview(arg).cast("B")) if not isinstance(arg, int) else arg
        self.calls.append((fd, request, data))
        answer = self.answers.get(request)
        if isinstance(answer, int):
            raise ioctl_error(answer, request)
        if answer is not None:
            answer(memoryview(arg).cast("B"))
        return 0

    def open(self, path, flags=0):
        self.opened.append(path)
        return 100 + len(self.opened)

    def close(self, fd):
        pass

    def pread(self, fd, length, offset):
        self.preads.append((fd, length, offset))
        return bytes(length)

    def pwrite(self, fd, data, offset):
        return len(data)

    def mmap(self, fd, length, offset=0, **kw):
        raise NotImplementedError

    def listdir(self, path):
        return self.dirs[path]

    def unit_of(self, pid):
        return None

    def kexec(self):
        raise NotImplementedError


def test_ioas_map_file_struct():
    host = ScriptedHost()
    iommufd = IommuFd.open(host)
    iommufd.ioas_map_file(7, fd=42, start=0, length=1 << 30, iova=0)
    fd, request, data = host.calls[-1]
    assert request == IOMMU_IOAS_MAP_FILE
    size, flags, ioas_id, map_fd, start, length, iova = struct.unpack("=IIIiQQQ", data)
    assert size == 40 and ioas_id == 7 and map_fd == 42 and length == 1 << 30 and iova == 0
    assert flags == IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE


def test_out_fields_are_read_back():
    host = ScriptedHost({IOMMU_IOAS_ALLOC: lambda b: struct.pack_into("=I", b, 8, 5)})
    assert IommuFd.open(host).ioas_alloc() == 5


def test_errno_propagates():
    host = ScriptedHost({IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE: errno.EINVAL})
    with pytest.raises(OSError) as e:
        IommuFd.open(host).hwpt_liveupdate_mark_preserve(3, 0x1234)
    assert e.value.errno == errno.EINVAL
    assert "IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE" in str(e.value)
    assert struct.unpack("=IIQ", host.calls[-1][2]) == (16, 3, 0x1234)


def test_iova_ranges_retries_on_emsgsize():
    attempts = []

    def answer(buf):
        size, ioas_id, num, _ = struct.unpack_from("=4I", buf)
        attempts.append(num)
        ptr = struct.unpack_from("=Q", buf, 16)[0]
        struct.pack_into("=I", buf, 8, 6)
        struct.pack_into("=Q", buf, 24, 4096)
        if num < 6:
            raise ioctl_error(errno.EMSGSIZE, IOMMU_IOAS_IOVA_RANGES)
        ranges = ffi.cast("struct iommu_iova_range *", ptr)
        for i in range(6):
            ranges[i].start, ranges[i].last = i << 32, (i << 32) + 0xFFFF

    host = ScriptedHost({IOMMU_IOAS_IOVA_RANGES: answer})
    ranges, alignment = IommuFd.open(host).ioas_iova_ranges(1)
    assert attempts == [4, 6]
    assert len(ranges) == 6 and ranges[5] == (5 << 32, (5 << 32) + 0xFFFF) and alignment == 4096


def test_vfio_msix_eventfds_follow_the_struct():
    host = ScriptedHost()
    dev = VfioDevice.open(host, "/dev/vfio/devices/vfio0")
    dev.enable_msix([10, -1, 12], start=1)
    _, request, data = host.calls[-1]
    assert request == VFIO_DEVICE_SET_IRQS
    assert struct.unpack_from("=5I", data) == (32, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                                               VFIO_PCI_MSIX_IRQ_INDEX, 1, 3)
    assert struct.unpack_from("=3i", data, 20) == (10, -1, 12)
    dev.disable_irqs()
    assert struct.unpack_from("=5I", host.calls[-1][2]) == (
        20, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSIX_IRQ_INDEX, 0, 0)


def test_vfio_bind_and_bdf_lookup():
    host = ScriptedHost({VFIO_DEVICE_BIND_IOMMUFD: lambda b: struct.pack_into("=I", b, 12, 9)},
                        dirs={"/sys/bus/pci/devices/0000:6a:01.0/vfio-dev": ["vfio3"]})
    dev = VfioDevice.open_bdf(host, "0000:6a:01.0")
    assert host.opened == ["/dev/vfio/devices/vfio3"]
    assert dev.bind_iommufd(77) == 9
    argsz, flags, iommufd, _, token = struct.unpack("=IIiIQ", host.calls[-1][2])
    assert (argsz, flags, iommufd, token) == (24, 0, 77, 0)


def test_vfio_region_access_uses_the_region_offset_and_checks_bounds():
    def region(buf):
        struct.pack_into("=QQ", buf, 16, 0x10000, 0)  # size, offset

    host = ScriptedHost({VFIO_DEVICE_GET_REGION_INFO: region})
    dev = VfioDevice.open(host, "/dev/vfio/devices/vfio0")
    dev.read32(VFIO_PCI_BAR0_REGION_INDEX, 0x100)
    assert host.preads[-1][1:] == (4, 0x100)
    with pytest.raises(ValueError, match="outside"):
        dev.read64(VFIO_PCI_BAR0_REGION_INDEX, 0xFFFC)


def test_luo_session_structs():
    host = ScriptedHost({LIVEUPDATE_IOCTL_CREATE_SESSION: lambda b: struct.pack_into("=i", b, 4, 55)})
    luo = LiveUpdate.open(host)
    session = luo.create_session("vm-a")
    size, fd = struct.unpack_from("=Ii", host.calls[-1][2])
    assert size == 72 and host.calls[-1][2][8:12] == b"vm-a" and host.calls[-1][2][12:72] == bytes(60)
    assert session.fd == 55 and session.name == "vm-a"
    session.preserve_fd(9, 0xFEED)
    assert host.calls[-1][1] == LIVEUPDATE_SESSION_PRESERVE_FD
    assert struct.unpack("=IiQ", host.calls[-1][2]) == (16, 9, 0xFEED)
    with pytest.raises(ValueError, match="65 bytes"):
        luo.create_session("x" * 65)
