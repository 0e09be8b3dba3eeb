"""The real host interface: kernel errnos pass through, bad arguments never reach the kernel."""

import errno
import mmap
import os

import pytest

from luvmm.abi import _IOR, ffi, new_arg
from luvmm.uapi import load_all
from luvmm.host import IoctlArgumentError, RealHost

load_all()
from luvmm.uapi.iommufd import IOMMU_IOAS_ALLOC, IOMMU_IOAS_MAP  # noqa: E402
from luvmm.uapi.vfio import VFIO_DEVICE_RESET, VFIO_DEVICE_SET_IRQS  # noqa: E402
from luvmm.uapi.kvm import KVM_GET_API_VERSION, KVM_GET_REGS  # noqa: E402


@pytest.fixture
def host():
    return RealHost()


@pytest.fixture
def closed_fd():
    fd = os.memfd_create("closed")
    os.close(fd)
    return fd


@pytest.fixture
def memfd():
    fd = os.memfd_create("luvmm-test")
    yield fd
    os.close(fd)


def test_unknown_path_is_enoent(host):
    with pytest.raises(OSError) as e:
        host.open("/dev/no-such-device-luvmm")
    assert e.value.errno == errno.ENOENT


def test_closed_fd_is_ebadf_and_names_the_ioctl(host, closed_fd):
    with pytest.raises(OSError) as e:
        host.ioctl(closed_fd, IOMMU_IOAS_ALLOC, ffi.buffer(new_arg("struct iommu_ioas_alloc")))
    assert e.value.errno == errno.EBADF
    assert "IOMMU_IOAS_ALLOC" in str(e.value)


def test_wrong_file_is_enotty(host, memfd):
    with pytest.raises(OSError) as e:
        host.ioctl(memfd, KVM_GET_API_VERSION)
    assert e.value.errno == errno.ENOTTY


# A short buffer is refused before any syscall: the fd is closed, so a syscall
# would have failed with EBADF instead.
def test_short_buffer_is_refused_before_the_syscall(host, closed_fd):
    with pytest.raises(IoctlArgumentError, match=r"IOMMU_IOAS_MAP needs struct iommu_ioas_map \(40 bytes\)"):
        host.ioctl(closed_fd, IOMMU_IOAS_MAP, bytearray(39))
    with pytest.raises(IoctlArgumentError, match="KVM_GET_REGS needs struct kvm_regs"):
        host.ioctl(closed_fd, KVM_GET_REGS, bytearray(8))


def test_size_field_larger_than_the_buffer_is_refused(host, closed_fd):
    arg = new_arg("struct iommu_ioas_alloc")
    arg.size = 4096
    with pytest.raises(IoctlArgumentError, match="size=4096"):
        host.ioctl(closed_fd, IOMMU_IOAS_ALLOC, ffi.buffer(arg))


def test_argument_kinds_are_checked(host, closed_fd):
    with pytest.raises(IoctlArgumentError, match="pointer to struct vfio_irq_set"):
        host.ioctl(closed_fd, VFIO_DEVICE_SET_IRQS, 0)
    with pytest.raises(IoctlArgumentError, match="integer argument"):
        host.ioctl(closed_fd, VFIO_DEVICE_RESET, bytearray(8))
    with pytest.raises(IoctlArgumentError, match="writable"):
        host.ioctl(closed_fd, IOMMU_IOAS_ALLOC, bytes(12))
    with pytest.raises(IoctlArgumentError, match="int or a writable buffer"):
        host.ioctl(closed_fd, IOMMU_IOAS_ALLOC, "12")


def test_unknown_requests_pass_through_with_their_encoded_size_checked(host, memfd):
    unknown = _IOR(0xAB, 0x7F, "uint64_t")  # not in luvmm's table
    with pytest.raises(IoctlArgumentError, match="8-byte argument"):
        host.ioctl(memfd, unknown, bytearray(4))
    with pytest.raises(OSError) as e:
        host.ioctl(memfd, unknown, bytearray(8))
    assert e.value.errno == errno.ENOTTY


def test_pread_pwrite_mmap(host, memfd):
    os.ftruncate(memfd, 2 * mmap.PAGESIZE)
    assert host.pwrite(memfd, b"luvmm", 100) == 5
    assert host.pread(memfd, 5, 100) == b"luvmm"
    m = host.mmap(memfd, 2 * mmap.PAGESIZE)
    assert m[100:105] == b"luvmm"
    m[mmap.PAGESIZE:mmap.PAGESIZE + 2] = b"ok"
    assert host.pread(memfd, 2, mmap.PAGESIZE) == b"ok"
    m.close()


def test_open_returns_cloexec(host, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"")
    fd = host.open(str(path))
    try:
        assert not os.get_inheritable(fd)
    finally:
        host.close(fd)


def test_listdir(host, tmp_path):
    (tmp_path / "vfio-dev").mkdir()
    (tmp_path / "vfio-dev" / "vfio3").mkdir()
    assert host.listdir(str(tmp_path / "vfio-dev")) == ["vfio3"]
