"""The DSA as a device: commands, software errors, interrupts and their PBA,
Bus Master Enable, resets, and engines that run beside everything else."""

import os
import struct

import pytest

from luvmm.devices.emu.dsa_driver import MSIX_VECTOR
from luvmm.devices.dsa_regs import (
    GENCTRL_SOFTERR_INT_EN,
    IDXD_CMD_ABORT_WQ,
    IDXD_CMD_DISABLE_WQ,
    IDXD_CMD_DRAIN_WQ,
    IDXD_CMD_ENABLE_DEVICE,
    IDXD_CMD_ENABLE_WQ,
    IDXD_CMD_OFFSET,
    IDXD_CMD_RESET_DEVICE,
    IDXD_CMDSTS_ACTIVE,
    IDXD_CMDSTS_ERR_BUSMASTER_EN,
    IDXD_CMDSTS_ERR_DEV_ENABLED,
    IDXD_CMDSTS_ERR_DEV_NOTEN,
    IDXD_CMDSTS_ERR_GRP_CONFIG2,
    IDXD_CMDSTS_ERR_WQ_ENABLED,
    IDXD_CMDSTS_ERR_WQ_MODE,
    IDXD_CMDSTS_ERR_WQ_SIZE,
    IDXD_CMDSTS_INVAL_CMD,
    IDXD_CMDSTS_OFFSET,
    IDXD_GENCTRL_OFFSET,
    IDXD_GENSTATS_OFFSET,
    IDXD_INTC_CMD,
    IDXD_INTC_ERR,
    IDXD_INTCAUSE_OFFSET,
    IDXD_SWERR_OFFSET,
    IDXD_SWERR_VALID,
    IDXD_SWERR_OVERFLOW,
    SWERR_ERROR_SHIFT,
    SWERR_PORTAL_WRITE_SIZE,
    SWERR_WQ_DISABLED,
    SWERR_WQ_FULL,
    command,
    wq_operand,
)
from luvmm.devices.emu.dsa_model import GRPCFG_TABLE, MSIX_PBA, MSIX_TABLE, WQCFG_TABLE
from luvmm.uapi.idxd import (
    DSA_COMP_NONE,
    DSA_COMP_SUCCESS,
    DSA_OPCODE_MEMMOVE,
    DSA_OPCODE_NOOP,
    IDXD_OP_FLAG_CRAV,
    IDXD_OP_FLAG_RCI,
    IDXD_OP_FLAG_RCR,
    pack_desc,
)
from luvmm.devices.emu.pci import MSIX_CAP_OFFSET
from luvmm.uapi.pci_regs import (
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_ENTRY_VECTOR_CTRL,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL,
)
from tests.support.dsa_rig import DATA, REC, make_rig, submit

CRAV_RCR = IDXD_OP_FLAG_CRAV | IDXD_OP_FLAG_RCR


def cmd_status(rig, cmd, operand=0, int_req=False):
    rig.driver.writel(IDXD_CMD_OFFSET, command(cmd, operand, int_req))
    assert rig.dev.wait_idle(10)
    status = rig.driver.readl(IDXD_CMDSTS_OFFSET)
    assert not status & IDXD_CMDSTS_ACTIVE
    return status & 0xFF


def swerr(rig):
    word = rig.driver.readq(IDXD_SWERR_OFFSET)
    return word, (word >> SWERR_ERROR_SHIFT) & 0xFF


def test_command_errors(rig):
    assert cmd_status(rig, IDXD_CMD_ENABLE_DEVICE) == IDXD_CMDSTS_ERR_DEV_ENABLED
    assert cmd_status(rig, IDXD_CMD_ENABLE_WQ, 0) == IDXD_CMDSTS_ERR_WQ_ENABLED
    assert cmd_status(rig, 0x1F) == IDXD_CMDSTS_INVAL_CMD
    assert cmd_status(rig, IDXD_CMD_RESET_DEVICE) == 0
    assert rig.driver.readl(IDXD_GENSTATS_OFFSET) & 3 == 0
    assert cmd_status(rig, IDXD_CMD_ENABLE_WQ, 0) == IDXD_CMDSTS_ERR_DEV_NOTEN
    rig.driver.writeq(GRPCFG_TABLE, 1)  # WQ 0 in group 0, but no engine
    assert cmd_status(rig, IDXD_CMD_ENABLE_DEVICE) == IDXD_CMDSTS_ERR_GRP_CONFIG2
    rig.driver.writeq(GRPCFG_TABLE + 32, 1)
    rig.dev.set_command_bits(PCI_COMMAND_MASTER, False)
    assert cmd_status(rig, IDXD_CMD_ENABLE_DEVICE) == IDXD_CMDSTS_ERR_BUSMASTER_EN
    rig.dev.set_command_bits(PCI_COMMAND_MASTER, True)
    assert cmd_status(rig, IDXD_CMD_ENABLE_DEVICE) == 0
    assert cmd_status(rig, IDXD_CMD_ENABLE_WQ, 0) == IDXD_CMDSTS_ERR_WQ_SIZE
    rig.driver.writel(WQCFG_TABLE, 16)
    assert cmd_status(rig, IDXD_CMD_ENABLE_WQ, 0) == IDXD_CMDSTS_ERR_WQ_MODE  # shared: not implemented
    rig.driver.writel(WQCFG_TABLE + 8, 1 | 1 << 4)
    assert cmd_status(rig, IDXD_CMD_ENABLE_WQ, 0) == 0


def test_configuration_is_locked_while_enabled(rig):
    before = rig.driver.readq(GRPCFG_TABLE + 32)
    rig.driver.writeq(GRPCFG_TABLE + 32, 0xF)
    assert rig.driver.readq(GRPCFG_TABLE + 32) == before
    rig.driver.writel(WQCFG_TABLE, 3)
    assert rig.driver.readl(WQCFG_TABLE) == 128


def test_command_completion_interrupt(rig):
    rig.driver.msix_enable(0)
    assert cmd_status(rig, IDXD_CMD_DRAIN_WQ, wq_operand(0), int_req=True) == 0
    assert rig.driver.readl(IDXD_INTCAUSE_OFFSET) & IDXD_INTC_CMD
    assert rig.eventfd_count(0) == 1
    rig.driver.writel(IDXD_INTCAUSE_OFFSET, IDXD_INTC_CMD)  # write 1 to clear
    assert rig.driver.readl(IDXD_INTCAUSE_OFFSET) == 0


def test_portal_errors_are_dropped_and_reported(rig):
    desc = pack_desc(opcode=DSA_OPCODE_NOOP, flags=CRAV_RCR, completion_addr=rig.iova(REC))
    rig.driver.desc_write(desc, wq=3)  # WQ 3 is not enabled
    word, error = swerr(rig)
    assert word & IDXD_SWERR_VALID and error == SWERR_WQ_DISABLED and (word >> 16) & 0xFF == 3
    rig.driver.desc_write(desc[:32])  # not a whole descriptor: a second error overflows
    assert swerr(rig)[0] & IDXD_SWERR_OVERFLOW
    rig.driver.writeq(IDXD_SWERR_OFFSET, IDXD_SWERR_VALID | IDXD_SWERR_OVERFLOW)
    assert swerr(rig)[0] == 0
    rig.dev.bar_write(2, 0, desc[:8])
    assert swerr(rig)[1] == SWERR_PORTAL_WRITE_SIZE
    assert rig.dev.stats.dropped_submissions == 3
    assert rig.dev.stats.descriptors == 0


def test_full_wq_drops_and_software_error_interrupt(rig):
    rig.driver.writel(IDXD_GENCTRL_OFFSET, GENCTRL_SOFTERR_INT_EN)
    rig.driver.msix_enable(0)
    rig.dev.set_command_bits(PCI_COMMAND_MASTER, False)  # the engines stall: the WQ fills
    desc = pack_desc(opcode=DSA_OPCODE_NOOP, flags=IDXD_OP_FLAG_CRAV, completion_addr=rig.iova(REC))
    for _ in range(128):
        rig.driver.desc_write(desc)
    assert swerr(rig)[0] == 0
    rig.driver.desc_write(desc)
    assert swerr(rig)[1] == SWERR_WQ_FULL
    assert rig.driver.readl(IDXD_INTCAUSE_OFFSET) & IDXD_INTC_ERR and rig.eventfd_count(0) == 1
    assert rig.driver.readl(WQCFG_TABLE + 24) & 0xFFFF == 128  # occupancy
    rig.dev.set_command_bits(PCI_COMMAND_MASTER, True)
    assert rig.dev.wait_idle(10)
    assert rig.dev.stats.descriptors == 128
    assert rig.driver.readl(WQCFG_TABLE + 24) & 0xFFFF == 0


# --- interrupts ------------------------------------------------------------------------------------

def rci(rig, vector=MSIX_VECTOR):
    submit(rig, opcode=DSA_OPCODE_NOOP, flags=CRAV_RCR | IDXD_OP_FLAG_RCI, int_handle=vector)


def pba(rig):
    return rig.driver.readq(MSIX_PBA)


def test_masked_vector_is_pending_until_unmasked(rig):
    ctrl = MSIX_TABLE + 2 * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL
    rig.driver.writel(ctrl, 1)  # vector 2 masked (it is after reset anyway)
    rci(rig, 2)
    rci(rig, 2)
    assert rig.eventfd_count(2) == 0 and pba(rig) == 1 << 2
    rig.driver.writel(ctrl, 0)
    assert rig.eventfd_count(2) == 1  # one pending bit: one message, never lost
    assert pba(rig) == 0


def test_unwired_vector_fires_when_an_eventfd_arrives(rig):
    rig.dev.msix.set_eventfd(MSIX_VECTOR, None)
    rci(rig)
    assert pba(rig) == 1 << MSIX_VECTOR
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    rig.dev.msix.set_eventfd(MSIX_VECTOR, fd)
    assert os.eventfd_read(fd) == 1 and pba(rig) == 0
    os.close(fd)


def test_msix_disable_and_function_mask_hold_interrupts(rig):
    flags_off = MSIX_CAP_OFFSET + PCI_MSIX_FLAGS
    flags = struct.unpack("<H", rig.dev.cfg_read(flags_off, 2))[0]
    rig.dev.cfg_write(flags_off, struct.pack("<H", flags | PCI_MSIX_FLAGS_MASKALL))
    rci(rig)
    assert rig.eventfd_count(MSIX_VECTOR) == 0 and pba(rig)
    rig.dev.cfg_write(flags_off, struct.pack("<H", (flags | PCI_MSIX_FLAGS_MASKALL) & ~PCI_MSIX_FLAGS_ENABLE))
    rig.dev.cfg_write(flags_off, struct.pack("<H", flags & ~PCI_MSIX_FLAGS_ENABLE))
    assert rig.eventfd_count(MSIX_VECTOR) == 0
    rig.dev.cfg_write(flags_off, struct.pack("<H", flags | PCI_MSIX_FLAGS_ENABLE))
    assert rig.eventfd_count(MSIX_VECTOR) == 1 and pba(rig) == 0


# --- bus master, drains, aborts and resets -----------------------------------------------------------

@pytest.fixture
def slow_rig():
    """A device moving 64 MiB/s: a 16 MiB copy is in flight for a quarter second."""
    r = make_rig(64 << 20, bandwidth=64 << 20)
    yield r
    r.close()


BIG = 16 << 20
SRC, DST = DATA, DATA + (20 << 20)


def start_big_copy(rig):
    rig.view[SRC:SRC + BIG] = os.urandom(1 << 20) * 16
    rig.view[REC:REC + 32] = bytes(32)
    rig.driver.desc_write(pack_desc(opcode=DSA_OPCODE_MEMMOVE, flags=CRAV_RCR, src=rig.iova(SRC),
                                    dst=rig.iova(DST), xfer_size=BIG, completion_addr=rig.iova(REC)))


def test_bus_master_clear_holds_dma(slow_rig):
    rig = slow_rig
    rig.dev.set_command_bits(PCI_COMMAND_MASTER, False)
    start_big_copy(rig)
    assert not rig.dev.wait_idle(0.3)  # nothing moves while Bus Master Enable is clear
    assert rig.view[REC] == DSA_COMP_NONE and rig.dev.stats.bytes == 0
    rig.dev.set_command_bits(PCI_COMMAND_MASTER, True)
    assert rig.dev.wait_idle(10)
    assert rig.view[REC] == DSA_COMP_SUCCESS
    assert rig.view[DST:DST + BIG] == rig.view[SRC:SRC + BIG]


def test_bus_master_clear_pauses_a_copy_in_flight(slow_rig):
    rig = slow_rig
    start_big_copy(rig)
    while rig.dev.stats.bytes == 0 and rig.view[REC] == 0:
        pass  # the copy has started
    rig.dev.set_command_bits(PCI_COMMAND_MASTER, False)
    moved = rig.dev.stats.bytes
    assert not rig.dev.wait_idle(0.2)
    assert rig.dev.stats.bytes <= moved + (1 << 21)  # at most the chunk that was in the copy engine
    rig.dev.set_command_bits(PCI_COMMAND_MASTER, True)
    assert rig.dev.wait_idle(10) and rig.view[REC] == DSA_COMP_SUCCESS
    assert rig.view[DST:DST + BIG] == rig.view[SRC:SRC + BIG]


def test_drain_waits_for_work_in_flight(slow_rig):
    rig = slow_rig
    start_big_copy(rig)
    rig.driver.writel(IDXD_CMD_OFFSET, command(IDXD_CMD_DRAIN_WQ, wq_operand(0)))
    assert rig.driver.readl(IDXD_CMDSTS_OFFSET) & IDXD_CMDSTS_ACTIVE  # still copying
    assert rig.dev.wait_idle(10)
    assert not rig.driver.readl(IDXD_CMDSTS_OFFSET) & IDXD_CMDSTS_ACTIVE
    assert rig.view[REC] == DSA_COMP_SUCCESS
    # DISABLE_WQ drains too, then the WQ refuses work.
    assert cmd_status(rig, IDXD_CMD_DISABLE_WQ, wq_operand(0)) == 0
    rig.driver.desc_write(pack_desc(opcode=DSA_OPCODE_NOOP, flags=CRAV_RCR, completion_addr=rig.iova(REC)))
    assert swerr(rig)[1] == SWERR_WQ_DISABLED


@pytest.mark.parametrize("how", ["reset", "abort", "flr"])
def test_reset_abort_and_flr_abort_work_in_flight(slow_rig, how):
    rig = slow_rig
    start_big_copy(rig)
    while rig.dev.stats.bytes == 0:
        pass
    if how == "reset":
        rig.driver.command(IDXD_CMD_RESET_DEVICE)
        assert rig.driver.readl(IDXD_GENSTATS_OFFSET) & 3 == 0
    elif how == "abort":
        rig.driver.command(IDXD_CMD_ABORT_WQ, wq_operand(0))
    else:
        rig.dev.cfg_write(0x40 + 0x08, struct.pack("<H", 0x8000))  # PCIe DEVCTL: initiate FLR
        assert rig.dev.flr_count == 1
        assert struct.unpack("<H", rig.dev.cfg_read(PCI_COMMAND, 2))[0] == 0
    assert rig.dev.wait_idle(10)
    assert rig.view[REC] == DSA_COMP_NONE  # aborted: no completion record
    assert rig.dev.stats.aborted == 1
    assert rig.dev.stats.bytes < BIG * 2


def test_engines_run_beside_the_caller():
    """While 256 MiB are copied the device keeps answering register reads:
    the copy does not hold the caller up (the engine releases the GIL)."""
    rig = make_rig(600 << 20)
    try:
        size = 256 << 20
        rig.view[REC:REC + 32] = bytes(32)
        rig.driver.desc_write(pack_desc(opcode=DSA_OPCODE_MEMMOVE, flags=CRAV_RCR, src=rig.iova(DATA),
                                        dst=rig.iova(DATA + size + 4096), xfer_size=size,
                                        completion_addr=rig.iova(REC)))
        reads = 0
        while rig.view[REC] == 0:
            rig.driver.readl(IDXD_GENSTATS_OFFSET)
            reads += 1
        assert rig.view[REC] == DSA_COMP_SUCCESS
        assert reads > 100, f"only {reads} register reads during the copy"
    finally:
        rig.close()
