"""Live update on the emulated host: the seed's vfio_pci_liveupdate_test, the
later VFIO live-update tests, DMA across a kexec under both kernel profiles,
and the negative tests that show preservation is what keeps DMA going."""

import errno
import os
import struct
import time

import pytest

from tests.support.helpers import errno_of

from luvmm.devices.emu.dsa_driver import BATCH_COMPLETION
from luvmm.uapi.idxd import DSA_COMP_SUCCESS
from luvmm.devices.iommufd import IommuFd
from luvmm.uapi.pci_regs import PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, PCI_INTERRUPT_LINE
from luvmm.devices.vfio import VfioDevice
from luvmm.liveupdate.luo import LiveUpdate
from tests.support.vfio_rig import DATA, DEVICE_TOKEN, HWPT_TOKEN, IOMMUFD_TOKEN, RAM_TOKEN, VfioRig, sealed_memfd

SLOW = {"dsa_bandwidth": 24 << 20}  # 24 MiB/s: a second of DMA in flight



def status(host):
    return host.call({"op": "status"})[0]


def device_status(host):
    return status(host)["kernel"]["vfio"][0]


def command(dev):
    return struct.unpack("<H", dev.config_read(PCI_COMMAND, 2))[0]


def test_vfio_pci_liveupdate_seed(emulated_host):
    """Bus Master Enable and the rest of the virtual config space survive."""
    host = emulated_host.host
    rig = VfioRig(host, init=False)
    rig.dev.config_write(PCI_COMMAND, struct.pack("<H", PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER))
    rig.dev.config_write(PCI_INTERRUPT_LINE, b"\x2a")
    rig.dev.config_write(0x10, struct.pack("<Q", 0xFE00_0000))  # a BAR programmed by the VMM
    before = rig.dev.config_read(0, 256)
    session = LiveUpdate.open(host).create_session("seed")
    rig.preserve(session)
    assert errno_of(rig.dev.reset) == errno.EBUSY  # state changes are refused while preserved
    assert errno_of(rig.dev.config_write, PCI_INTERRUPT_LINE, b"\x01") == errno.EBUSY
    host.kexec()
    session = LiveUpdate.open(host).retrieve_session("seed")
    dev = VfioDevice(host, session.retrieve_fd(DEVICE_TOKEN))
    iommufd = IommuFd(host, session.retrieve_fd(IOMMUFD_TOKEN))
    dev.bind_iommufd(iommufd)
    assert dev.config_read(0, 256) == before
    assert command(dev) & PCI_COMMAND_MASTER
    assert device_status(host)["bus_master"]  # the hardware kept it too
    rig.close()


def test_vfio_liveupdate_sequence(emulated_host):
    """Preserve the cdev; after the kexec opening it is EBUSY; retrieve; FINISH
    is refused before bind; bind, map the preserved memfd, FINISH; DMA works."""
    host = emulated_host.host
    rig = VfioRig(host)
    session = LiveUpdate.open(host).create_session("vfio-lu")
    rig.preserve(session)
    host.kexec()
    assert errno_of(host.open, "/dev/vfio/devices/vfio0") == errno.EBUSY
    session = LiveUpdate.open(host).retrieve_session("vfio-lu")
    dev = VfioDevice(host, session.retrieve_fd(DEVICE_TOKEN))
    assert errno_of(session.finish) == errno.EBUSY  # not bound yet
    memfd = session.retrieve_fd(RAM_TOKEN)
    iommufd = IommuFd.open(host)  # a fresh iommufd: map the preserved memfd again
    ioas = iommufd.ioas_alloc()
    iommufd.ioas_map_file(ioas, memfd, 0, rig.size, iova=0)
    dev_id = dev.bind_iommufd(iommufd)
    dev.attach_pt(iommufd.hwpt_alloc(dev_id, ioas))
    session.finish()
    # The device kept its configuration (no reset): the driver submits at once.
    drv = rig.driver_for(dev)
    rig.view[DATA:DATA + 4096] = os.urandom(4096)
    drv.memcpy_start(DATA, DATA + 0x8000, 4096, 1)
    assert drv.memcpy_wait() == DSA_COMP_SUCCESS
    assert rig.view[DATA + 0x8000:DATA + 0x9000] == rig.view[DATA:DATA + 4096]
    rig.close()


def start_long_dma(rig, batches=24):
    """24 batches of 1024 x 1 KiB copies (24 MiB: a second at 24 MiB/s)."""
    rig.view[DATA:DATA + 1024] = os.urandom(1024)
    rig.driver.memcpy_start(DATA, DATA + 0x10000, 1024, batches * 1024)


def descriptors(host):
    return device_status(host)["descriptors"]


@pytest.mark.parametrize("emulated_host", [SLOW], indirect=True)
def test_dma_keeps_running_through_the_kexec(emulated_host):
    host = emulated_host.host
    rig = VfioRig(host)
    session = LiveUpdate.open(host).create_session("dma")
    rig.preserve(session)
    start_long_dma(rig)
    before = descriptors(host)
    info = host.kexec()
    after = descriptors(host)
    assert after > before, "no DMA completed while the kernel was replaced"
    assert rig.view[BATCH_COMPLETION] == 0  # still running after the kexec
    # Re-attach without a reset, as a restored VMM does, and let it finish.
    session = LiveUpdate.open(host).retrieve_session("dma")
    dev = VfioDevice(host, session.retrieve_fd(DEVICE_TOKEN))
    iommufd = IommuFd(host, session.retrieve_fd(IOMMUFD_TOKEN))
    dev_id = dev.bind_iommufd(iommufd)
    dev.attach_pt(rig.hwpt)  # the preserved HWPT keeps its id
    dev.enable_msix([rig.eventfd], start=1)  # userspace re-arms interrupts
    session.finish()
    drv = rig.driver_for(dev, timeout=30)
    drv.memcpy_count = 24 * 1024
    assert drv.memcpy_wait() == DSA_COMP_SUCCESS  # all of it, correctly
    assert rig.view[DATA + 0x10000:DATA + 0x10400] == rig.view[DATA:DATA + 1024]
    assert device_status(host)["errors"] == 0
    assert info["kho_error"] is None and dev_id
    rig.close()


@pytest.mark.parametrize("emulated_host", [dict(SLOW, profile="reset-on-freeze")], indirect=True)
def test_reset_on_freeze_stops_dma(emulated_host):
    host = emulated_host.host
    rig = VfioRig(host)
    session = LiveUpdate.open(host).create_session("rof")
    rig.preserve(session)
    start_long_dma(rig)
    # The upstream series: interrupts still enabled -> the reboot fails with EINVAL.
    assert errno_of(host.kexec) == errno.EINVAL
    assert status(host)["kexec_count"] == 0
    rig.dev.disable_irqs()
    host.kexec()
    stopped_at = descriptors(host)
    dev_state = device_status(host)
    assert not dev_state["enabled"] and not dev_state["bus_master"]  # reset at freeze
    assert device_status(host)["queued"] == 0  # queued work was aborted by the reset
    assert descriptors(host) == stopped_at
    assert rig.view[BATCH_COMPLETION] == 0  # the work never finished
    rig.close()


@pytest.mark.parametrize("emulated_host", [SLOW], indirect=True)
@pytest.mark.parametrize("missing", ["device", "iommufd"])
def test_without_preservation_dma_stops(emulated_host, missing):
    host = emulated_host.host
    rig = VfioRig(host)
    session = LiveUpdate.open(host).create_session("partial")
    rig.preserve(session, device=missing != "device", iommufd=missing != "iommufd")
    start_long_dma(rig)
    host.kexec()
    dev_state = device_status(host)
    if missing == "device":
        assert not dev_state["bus_master"]  # cleared at kexec: queued work waits forever
        assert dev_state["queued"] > 0
    else:
        # The device runs on, but its page tables are gone: every access faults.
        assert dev_state["bus_master"]
    if missing == "device":
        # Bus Master Enable was cleared at the kexec: the queued work cannot move.
        assert not dev_state["bus_master"] and dev_state["queued"] > 0
    else:
        # The device runs on, but its page tables are gone: every access faults
        # (the completion records cannot even be written: software errors).
        assert dev_state["bus_master"]
        deadline = time.monotonic() + 30
        while device_status(host)["queued"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert device_status(host)["queued"] == 0
        assert device_status(host)["errors"] > 0
    assert rig.view[BATCH_COMPLETION] == 0  # the batch never completed
    rig.close()


def test_hwpt_preservation_rules(emulated_host):
    host = emulated_host.host
    iommufd = IommuFd.open(host)
    ioas = iommufd.ioas_alloc()
    unsealed = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(unsealed, 1 << 20)
    iommufd.ioas_map_file(ioas, unsealed, 0, 1 << 20, iova=0)
    dev = VfioDevice.open(host, "/dev/vfio/devices/vfio0")
    hwpt = iommufd.hwpt_alloc(dev.bind_iommufd(iommufd), ioas)
    assert errno_of(iommufd.hwpt_liveupdate_mark_preserve, hwpt, 1) == errno.EINVAL  # not sealed
    iommufd.ioas_unmap(ioas, 0, 1 << 20)
    ram = sealed_memfd("ram", 1 << 20)
    iommufd.ioas_map_file(ioas, ram, 0, 1 << 20, iova=0)
    iommufd.hwpt_liveupdate_mark_preserve(hwpt, HWPT_TOKEN)
    # The IOAS is immutable now.
    assert errno_of(iommufd.ioas_map_file, ioas, ram, 0, 4096, 0x200000) == errno.EBUSY
    assert errno_of(iommufd.ioas_unmap, ioas, 0, 1 << 20) == errno.EBUSY
    # The memfd must be preserved in the same session, before the kexec.
    luo = LiveUpdate.open(host)
    session = luo.create_session("hwpt")
    session.preserve_fd(iommufd.fd, IOMMUFD_TOKEN)
    assert errno_of(host.kexec) == errno.EINVAL
    luo.create_session("other").preserve_fd(ram, RAM_TOKEN)
    assert errno_of(host.kexec) == errno.EINVAL  # preserved, but in another session
    assert status(host)["kexec_count"] == 0


def test_failed_freeze_unfreezes_the_others(emulated_host):
    host = emulated_host.host
    rig = VfioRig(host)
    luo = LiveUpdate.open(host)
    session = luo.create_session("good")
    rig.preserve(session)
    assert device_status(host)["msix_vectors"] == [1]
    bad = luo.create_session("bad")
    grows = os.memfd_create("grows", 0)  # F_SEAL_SEAL: LUO cannot freeze its size with a seal
    os.ftruncate(grows, 4096)
    bad.preserve_fd(grows, 1)
    os.ftruncate(grows, 8192)
    assert errno_of(host.kexec) == errno.EBUSY
    assert status(host)["kexec_count"] == 0
    assert device_status(host)["msix_vectors"] == [1]  # interrupts back on
    rig.driver.send_msi()
    assert rig.interrupts() == 1
    rig.close()


def test_writes_posted_just_before_a_kexec_reach_the_device(emulated_host):
    """A VMM's run loop posts a guest's portal stores (OP_PWRITE_POSTED: no
    reply, as a bus posts an MMIO write) and the guest is paused right
    after: descriptors still queued on the device's file when the kexec
    comes reach the device before the freeze -- none is dropped with the old
    kernel's files -- as a posted PCIe write reaches its device before
    anything its CPU does next."""
    from luvmm.uapi.idxd import DSA_OPCODE_MEMMOVE, IDXD_OP_FLAG_CRAV, IDXD_OP_FLAG_RCR, pack_desc
    from luvmm.uapi.vfio import VFIO_PCI_BAR2_REGION_INDEX
    from luvmm.wire import OP_PWRITE_POSTED
    from luvmm.vmm.runloop import wire_header

    host = emulated_host.host
    rig = VfioRig(host)
    rig.preserve(LiveUpdate.open(host).create_session("posted"))
    portal = rig.dev.get_region_info(VFIO_PCI_BAR2_REGION_INDEX).offset
    records = DATA + 0x40000
    count = 48  # within the work queue's depth
    rig.view[DATA:DATA + 64] = os.urandom(64)
    rig.view[records:records + 32 * count] = bytes(32 * count)
    for i in range(count):
        desc = pack_desc(opcode=DSA_OPCODE_MEMMOVE, flags=IDXD_OP_FLAG_CRAV | IDXD_OP_FLAG_RCR, priv=1, src=DATA,
                         dst=DATA + 0x1000 + 64 * i, xfer_size=64, completion_addr=records + 32 * i)
        os.write(rig.dev.fd, wire_header(OP_PWRITE_POSTED, 64, portal) + desc)
    host.kexec()  # at once: most of them are still queued on the file's socket
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(rig.view[records + 32 * i] for i in range(count)):
        time.sleep(0.01)  # polling guest RAM for the device's completion records
    assert [rig.view[records + 32 * i] for i in range(count)] == [DSA_COMP_SUCCESS] * count
    assert all(rig.view[DATA + 0x1000 + 64 * i:DATA + 0x1040 + 64 * i] == rig.view[DATA:DATA + 64]
               for i in range(count))
    rig.close()
