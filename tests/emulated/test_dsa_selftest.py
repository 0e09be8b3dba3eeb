"""The emulated DSA driven exactly as the VFIO selftests' DSA driver drives a real one."""

import os
import struct

from luvmm.devices.emu.dsa_driver import BATCH_COMPLETION, COPY_COMPLETION, MSIX_VECTOR
from luvmm.devices.dsa_regs import IDXD_DEVICE_STATE_ENABLED, IDXD_GENSTATS_OFFSET, IDXD_SWERR_OFFSET, WQCFG_OCCUP_IDX
from luvmm.devices.emu.dsa_model import WQCFG_TABLE
from luvmm.uapi.idxd import DSA_COMP_PAGE_FAULT_NOBOF, DSA_COMP_STATUS_WRITE, DSA_COMP_SUCCESS, unpack_completion
from luvmm.uapi.pci_regs import PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY
from tests.support.dsa_rig import DATA


def test_init_sequence(rig):
    dev, drv = rig.dev, rig.driver
    command = struct.unpack("<H", dev.cfg_read(PCI_COMMAND, 2))[0]
    assert command == PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE
    assert drv.readl(IDXD_GENSTATS_OFFSET) & 3 == IDXD_DEVICE_STATE_ENABLED
    assert drv.readl(WQCFG_TABLE + 4 * WQCFG_OCCUP_IDX) >> 30 == 1  # WQ 0 enabled
    assert drv.readl(WQCFG_TABLE) == 128 and drv.readl(WQCFG_TABLE + 8) & 1 == 1  # full size, dedicated
    assert drv.max_memcpy_size == 1 << 31 and drv.max_copies_per_batch == 1024
    assert drv.readq(IDXD_SWERR_OFFSET) == 0


def test_memcpy_one(rig):
    src, dst = DATA, DATA + 0x10000
    rig.view[src:src + 4096] = os.urandom(4096)
    rig.driver.memcpy_start(rig.iova(src), rig.iova(dst), 4096, 1)
    assert rig.driver.memcpy_wait() == DSA_COMP_SUCCESS
    assert rig.view[dst:dst + 4096] == rig.view[src:src + 4096]
    assert rig.eventfd_count(MSIX_VECTOR) == 0  # no RCI, no interrupt


def test_memcpy_32_batches_of_1024(rig):
    src, dst, size = DATA, DATA + 0x1000, 64
    rig.view[src:src + size] = bytes(range(size))
    count = rig.driver.max_memcpy_count
    assert count == 32 * 1024
    rig.driver.memcpy_start(rig.iova(src), rig.iova(dst), size, count)
    assert rig.driver.memcpy_wait() == DSA_COMP_SUCCESS
    record = unpack_completion(bytes(rig.view[BATCH_COMPLETION:BATCH_COMPLETION + 32]))
    assert record["bytes_completed"] == 1024  # descs_completed of the last batch
    assert rig.view[dst:dst + size] == bytes(range(size))
    assert rig.dev.stats.descriptors == count + 32
    # Only the last batch asked for a record: the first 31 wrote none of their own.
    assert rig.dev.stats.batches == 32


def test_send_msi_fires_the_eventfd_exactly_once(rig):
    rig.driver.send_msi()
    assert rig.eventfd_count(MSIX_VECTOR) == 1
    assert rig.eventfd_count(MSIX_VECTOR) == 0
    assert rig.eventfd_count(0) == 0


def test_unmapped_iova_faults_without_interrupt_and_device_stays_usable(rig):
    unmapped = 0x7_0000_0000
    rig.driver.memcpy_start(rig.iova(DATA), unmapped, 4096, 1)
    status = rig.driver.completion_wait(COPY_COMPLETION)
    record = unpack_completion(bytes(rig.view[COPY_COMPLETION:COPY_COMPLETION + 32]))
    assert status == DSA_COMP_PAGE_FAULT_NOBOF | DSA_COMP_STATUS_WRITE
    assert record["fault_addr"] == unmapped and record["bytes_completed"] == 0
    assert all(rig.eventfd_count(v) == 0 for v in range(rig.dev.msix.nvec))
    assert rig.driver.readq(IDXD_SWERR_OFFSET) == 0  # reported in the record, not as a software error
    # The device keeps working.
    rig.view[DATA:DATA + 8] = b"luvmm-ok"
    rig.driver.memcpy_start(rig.iova(DATA), rig.iova(DATA + 64), 8, 1)
    assert rig.driver.memcpy_wait() == DSA_COMP_SUCCESS
    assert rig.view[DATA + 64:DATA + 72] == b"luvmm-ok"
