"""VFIO cdev and iommufd on the emulated host, through the host interface."""

import errno
import os
import struct


from tests.support.helpers import errno_of

from luvmm.abi import ffi, new_arg
from devices.emu.dsa_driver import COPY_COMPLETION
from luvmm.uapi.idxd import DSA_COMP_SUCCESS
from devices.iommufd import IommuFd
from luvmm.uapi.iommufd import IOMMU_IOAS_ALLOC
from luvmm.uapi.pci_regs import PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY
from devices.vfio import VfioDevice
from luvmm.uapi.vfio import (
    VFIO_DEVICE_FLAGS_PCI,
    VFIO_DEVICE_FLAGS_RESET,
    VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_BAR2_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_NUM_IRQS,
    VFIO_PCI_NUM_REGIONS,
)
from tests.support.vfio_rig import DATA, VfioRig, sealed_memfd



def test_sysfs_and_cdev(emulated_host):
    host = emulated_host.host
    bdfs = host.listdir("/sys/bus/pci/devices")
    assert bdfs == ["0000:6a:01.0"]
    assert host.listdir(f"/sys/bus/pci/devices/{bdfs[0]}/vfio-dev") == ["vfio0"]
    assert errno_of(host.open, "/dev/vfio/devices/vfio9") == errno.ENOENT
    assert errno_of(host.listdir, "/sys/bus/pci/devices/0000:00:00.0/vfio-dev") == errno.ENOENT


def test_device_needs_a_bind_first(emulated_host):
    host = emulated_host.host
    dev = VfioDevice.open(host, "/dev/vfio/devices/vfio0")
    assert errno_of(dev.get_info) == errno.EINVAL
    assert errno_of(dev.config_read, 0, 4) == errno.EINVAL
    efd = os.eventfd(0)
    assert errno_of(dev.bind_iommufd, efd) == errno.EBADFD  # not an iommufd
    luo_like = host.open("/dev/liveupdate")
    assert errno_of(dev.bind_iommufd, luo_like) == errno.EBADFD  # emulated, but not an iommufd
    iommufd = IommuFd.open(host)
    assert dev.bind_iommufd(iommufd) >= 1
    assert errno_of(dev.bind_iommufd, iommufd) == errno.EINVAL  # bound already
    info = dev.get_info()
    assert info.flags == VFIO_DEVICE_FLAGS_RESET | VFIO_DEVICE_FLAGS_PCI
    assert (info.num_regions, info.num_irqs) == (VFIO_PCI_NUM_REGIONS, VFIO_PCI_NUM_IRQS)
    assert dev.get_region_info(VFIO_PCI_BAR0_REGION_INDEX).size == 64 << 10
    assert dev.get_region_info(VFIO_PCI_BAR2_REGION_INDEX).size == 128 << 10
    assert dev.get_region_info(VFIO_PCI_CONFIG_REGION_INDEX).size == 4096
    assert errno_of(dev.get_region_info, VFIO_PCI_NUM_REGIONS) == errno.EINVAL
    assert dev.get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX).count == 9
    assert struct.unpack("<HH", dev.config_read(0, 4)) == (0x8086, 0x0B25)
    # A second fd cannot bind the device while the first holds it.
    other = VfioDevice.open(host, "/dev/vfio/devices/vfio0")
    assert errno_of(other.bind_iommufd, IommuFd.open(host)) == errno.EINVAL


def test_iommufd_rules(emulated_host):
    host = emulated_host.host
    iommufd = IommuFd.open(host)
    ioas = iommufd.ioas_alloc()
    mem = sealed_memfd("ram", 1 << 20)
    # A user VA cannot be pinned by the daemon: refused, clearly.
    assert errno_of(iommufd.ioas_map, ioas, 0x7F0000000000, 4096) == errno.EOPNOTSUPP
    assert iommufd.ioas_map_file(ioas, mem, 0, 1 << 20, iova=0x100000) == 0x100000
    assert errno_of(iommufd.ioas_map_file, ioas, mem, 0, 4096, iova=0x100000) == errno.EEXIST
    assert errno_of(iommufd.ioas_map_file, ioas, mem, 0, 100, iova=0x400000) == errno.EINVAL
    assert errno_of(iommufd.ioas_map_file, ioas, os.eventfd(0), 0, 4096, iova=0x400000) == errno.EINVAL
    auto = iommufd.ioas_map_file(ioas, mem, 0, 8192)  # kernel-chosen IOVA
    assert auto % 4096 == 0 and not (0x100000 <= auto < 0x200000)
    assert errno_of(iommufd.ioas_unmap, ioas, 0x100000, 4096) == errno.ENOENT  # not a whole area
    assert iommufd.ioas_unmap(ioas, auto, 8192) == 8192
    ranges, alignment = iommufd.ioas_iova_ranges(ioas)  # two-step EMSGSIZE through a user pointer
    assert alignment == 4096 and ranges[0][0] == 0 and len(ranges) == 2
    assert errno_of(iommufd.destroy, 999) == errno.ENOENT
    assert errno_of(iommufd.hwpt_alloc, 999, ioas) == errno.ENOENT
    # Non-zero reserved bytes, flags nobody defined: EOPNOTSUPP, as iommufd says.
    arg = new_arg("struct iommu_ioas_alloc", flags=1)
    assert errno_of(host.ioctl, iommufd.fd, IOMMU_IOAS_ALLOC, ffi.buffer(arg)) == errno.EOPNOTSUPP
    arg = bytearray(16)
    struct.pack_into("<I", arg, 0, 16)
    arg[15] = 1  # past what the kernel knows
    assert errno_of(host.ioctl, iommufd.fd, IOMMU_IOAS_ALLOC, arg) == errno.E2BIG


def test_dma_through_vfio_and_iommufd(emulated_host):
    rig = VfioRig(emulated_host.host)
    try:
        command = struct.unpack("<H", rig.dev.config_read(PCI_COMMAND, 2))[0]
        assert command & (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER) == PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
        rig.view[DATA:DATA + 4096] = os.urandom(4096)
        rig.driver.memcpy_start(DATA, DATA + 0x10000, 4096, 1)
        assert rig.driver.memcpy_wait() == DSA_COMP_SUCCESS
        assert rig.view[DATA + 0x10000:DATA + 0x11000] == rig.view[DATA:DATA + 4096]
        rig.driver.memcpy_start(DATA, DATA + 0x100000, 64, 4096)  # batches
        assert rig.driver.memcpy_wait() == DSA_COMP_SUCCESS
        rig.driver.send_msi()
        assert rig.interrupts() == 1  # MSI-X through VFIO_DEVICE_SET_IRQS
        # The HWPT is in use: iommufd refuses to destroy it.
        assert errno_of(rig.iommufd.destroy, rig.hwpt) == errno.EBUSY
        # Disable MSI-X: the next interrupt is pending, not delivered.
        rig.dev.disable_irqs()
        rig.driver.send_msi()
        assert rig.interrupts() == 0
        # An unmapped IOVA: a fault in the record, and the device stays usable.
        rig.driver.memcpy_start(DATA, rig.size + 0x1000, 64, 1)
        assert rig.driver.completion_wait(COPY_COMPLETION) & 0x7F == 0x03
    finally:
        rig.close()


def test_closing_the_device_disables_it(emulated_host):
    host = emulated_host.host
    rig = VfioRig(host)
    rig.dev.close()
    status = host.call({"op": "status"})[0]["kernel"]["vfio"][0]
    assert not status["bound"] and not status["bus_master"] and not status["enabled"]
    rig.close()
