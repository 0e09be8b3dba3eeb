"""VFIO cdev and iommufd on the emulated host, through the host interface."""

import errno
import os
import struct

import pytest


from tests.support.helpers import errno_of

from luvmm.abi import ffi, new_arg
from luvmm.devices.emu.dsa_driver import COPY_COMPLETION
from luvmm.uapi.idxd import DSA_COMP_SUCCESS
from luvmm.devices.iommufd import IommuFd
from luvmm.uapi.iommufd import IOMMU_IOAS_ALLOC
from luvmm.uapi.pci_regs import PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY
from luvmm.devices.vfio import VfioDevice
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
    # A user VA maps lazily, as on a real kernel (nothing pinned without a
    # domain); the daemon cannot pin it later, and says so with ECANNOTPIN.
    user_ioas = iommufd.ioas_alloc()
    user_iova = iommufd.ioas_map(user_ioas, 0x7F0000000000, 4096)
    assert iommufd.ioas_unmap(user_ioas, user_iova, 4096) == 4096
    assert iommufd.ioas_map_file(ioas, mem, 0, 1 << 20, iova=0x100000) == 0x100000
    assert errno_of(iommufd.ioas_map_file, ioas, mem, 0, 4096, iova=0x100000) == errno.EEXIST
    assert errno_of(iommufd.ioas_map_file, ioas, mem, 0, 100, iova=0x400000) == errno.EINVAL
    assert errno_of(iommufd.ioas_map_file, ioas, os.eventfd(0), 0, 4096, iova=0x400000) == errno.EINVAL
    auto = iommufd.ioas_map_file(ioas, mem, 0, 8192)  # kernel-chosen IOVA
    assert auto % 4096 == 0 and not (0x100000 <= auto < 0x200000)
    assert errno_of(iommufd.ioas_unmap, ioas, 0x100000, 4096) == errno.ENOENT  # not a whole area
    assert iommufd.ioas_unmap(ioas, auto, 8192) == 8192
    # No domain uses the IOAS: the whole u64, alignment 1 (iommufd_ioas_iova_ranges).
    assert iommufd.ioas_iova_ranges(ioas) == ([(0, (1 << 64) - 1)], 1)
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


def test_user_va_cannot_be_pinned_and_a_domain_brings_its_aperture(emulated_host):
    """The emulated kernel's one declared limit (iommufd.ECANNOTPIN): a HWPT
    over an IOAS with a user-VA area, or a user-VA map into an IOAS a domain
    uses, is EREMOTE.  A domain brings the aperture and 4 KiB alignment."""
    from luvmm.liveupdate.emu.kernel.iommufd import ECANNOTPIN

    rig = VfioRig(emulated_host.host)
    try:
        ranges, alignment = rig.iommufd.ioas_iova_ranges(rig.ioas)
        assert alignment == 4096 and ranges[0][0] == 0 and len(ranges) == 2  # less the MSI window
        assert errno_of(rig.iommufd.ioas_map, rig.ioas, 0x7F0000000000, 4096) == ECANNOTPIN
        user = rig.iommufd.ioas_alloc()
        rig.iommufd.ioas_map(user, 0x7F0000000000, 4096)
        assert errno_of(rig.iommufd.hwpt_alloc, rig.dev_id, user) == ECANNOTPIN == errno.EREMOTE
        assert errno_of(rig.iommufd.destroy, rig.dev_id) == errno.EBUSY  # VFIO holds the device object
    finally:
        rig.close()


def test_reset_restores_config_and_msix(emulated_host):
    """vfio_pci_ioctl_reset -> pci_try_reset_function saves and restores the
    config space: Bus Master and MSI-X enable, and the vectors, survive."""
    rig = VfioRig(emulated_host.host)
    try:
        before = struct.unpack("<H", rig.dev.config_read(PCI_COMMAND, 2))[0]
        assert before & PCI_COMMAND_MASTER
        rig.driver.send_msi()
        assert rig.interrupts() == 1
        rig.dev.reset()
        assert struct.unpack("<H", rig.dev.config_read(PCI_COMMAND, 2))[0] == before
        status = emulated_host.host.call({"op": "status"})[0]["kernel"]["vfio"][0]
        assert status["bus_master"] and status["msix_vectors"]
    finally:
        rig.close()


def test_closing_the_device_disables_it(emulated_host):
    host = emulated_host.host
    rig = VfioRig(host)
    rig.dev.close()
    status = host.call({"op": "status"})[0]["kernel"]["vfio"][0]
    assert not status["bound"] and not status["bus_master"] and not status["enabled"]
    rig.close()


@pytest.mark.timeout(300)
def test_a_daemon_started_with_1024_fds_holds_1500_sessions():
    """A real kernel holds thousands of LUO sessions; the daemon's files are
    its fds, so it raises its RLIMIT_NOFILE soft limit to the hard one when it
    starts (luvmm.liveupdate.emu.daemon.raise_fd_limit), even when started with the
    common soft limit of 1024.  (This client's fds count too: it raises its
    own soft limit for the test.)"""
    import resource
    import shutil
    import tempfile

    from luvmm.liveupdate.emu import hostctl
    from luvmm.liveupdate.emu.client import connect
    from luvmm.liveupdate.luo import LiveUpdate
    from luvmm.liveupdate.state import StateDir

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 3500:
        pytest.skip(f"needs 3500 fds (hard limit {hard})")
    path = tempfile.mkdtemp(prefix="luvmm-test-")
    state = StateDir(path)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # what the daemon inherits
    try:
        hostctl.start(state, agent=False)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    host = connect(state.socket)
    sessions = []
    try:
        assert resource.prlimit(state.pid(), resource.RLIMIT_NOFILE) == (hard, hard)
        luo = LiveUpdate.open(host)
        for i in range(1500):
            sessions.append(luo.create_session(f"many-{i:05d}"))
        assert len(host.call({"op": "status"})[0]["kernel"]["sessions"]) == 1500
        for s in sessions:
            s.close()
        luo.close()
    finally:
        host.close_connection()
        hostctl.stop(state)
        shutil.rmtree(path, ignore_errors=True)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
