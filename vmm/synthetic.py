"""The synthetic guest: the firmware's DMA workload driven from the host side,
for machines without a usable /dev/kvm.

It stands in for vCPU 0 -- a thread of the VMM -- and does exactly what
vmm/firmware/fw.c does, in the same guest memory and through the same device
regions: initialise the DSA like a driver, keep batches of MEMMOVE + fenced
COMPVAL in flight, count in the mailbox, bump the heartbeat.  Its "registers"
(which batch each slot holds, the next sequence number) go into the machine
state like a vCPU's do.
"""

from __future__ import annotations

import struct

from luvmm.devices.dsa_regs import (
    IDXD_CMD_ENABLE_DEVICE,
    IDXD_CMD_ENABLE_WQ,
    IDXD_CMD_RESET_DEVICE,
    IDXD_CMDSTS_ACTIVE,
    IDXD_CMDSTS_OFFSET,
    IDXD_CMD_OFFSET,
    IDXD_GENCAP_OFFSET,
    IDXD_TABLE_OFFSET,
    IDXD_WQCAP_OFFSET,
    command,
)
from luvmm.uapi.idxd import (
    DSA_COMP_SUCCESS,
    DSA_COMP_SUCCESS_PRED,
    DSA_OPCODE_BATCH,
    DSA_OPCODE_COMPVAL,
    DSA_OPCODE_MEMMOVE,
    IDXD_OP_FLAG_CR,
    IDXD_OP_FLAG_CRAV,
    IDXD_OP_FLAG_FENCE,
    IDXD_OP_FLAG_RCR,
    pack_desc,
)
from luvmm.uapi.vfio import VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_BAR2_REGION_INDEX

MAX_SLOTS, MAX_PAIRS = 64, 16
MASK = (1 << 64) - 1


def pattern(seq: int) -> int:
    return ((0x9E3779B97F4A7C15 * seq) & MASK) ^ 0x4C55564D4D


class SyntheticCpu:
    id = 0

    def __init__(self, vm):
        self.vm = vm
        self.slot_seq = [0] * MAX_SLOTS
        self.next_seq = 1

    # --- the firmware's layout of the DMA area ------------------------------------------

    def _base(self) -> int:
        return self.vm.mailbox["dma_base"]

    def batch_record(self, s: int) -> int:
        return self._base() + s * 32

    def member_record(self, s: int, i: int) -> int:
        return self._base() + 0x1000 + (s * 2 * MAX_PAIRS + i) * 32

    def desc_list(self, s: int) -> int:
        return self._base() + 0x20000 + s * 2 * MAX_PAIRS * 64

    def buffer(self, s: int, p: int, which: int) -> int:
        return self._base() + 0x100000 + ((s * MAX_PAIRS + p) * 2 + which) * self.vm.mailbox["xfer"]

    # --- the workload --------------------------------------------------------------------------

    def _command(self, cmd: int, operand: int = 0) -> bool:
        dev = self.vm.dev
        dev.write32(VFIO_PCI_BAR0_REGION_INDEX, IDXD_CMD_OFFSET, command(cmd, operand))
        while (sts := dev.read32(VFIO_PCI_BAR0_REGION_INDEX, IDXD_CMDSTS_OFFSET)) & IDXD_CMDSTS_ACTIVE:
            pass
        if sts & 0xFF:
            self.vm.mailbox["init_error"] = cmd << 8 | (sts & 0xFF)
            return False
        return True

    def init_device(self) -> bool:
        dev, bar0 = self.vm.dev, VFIO_PCI_BAR0_REGION_INDEX
        if not self._command(IDXD_CMD_RESET_DEVICE):
            return False
        gencap, wqcap = dev.read64(bar0, IDXD_GENCAP_OFFSET), dev.read64(bar0, IDXD_WQCAP_OFFSET)
        offsets = dev.read64(bar0, IDXD_TABLE_OFFSET)
        grpcfg, wqcfg = (offsets & 0xFFFF) * 0x100, ((offsets >> 16) & 0xFFFF) * 0x100
        dev.write32(bar0, wqcfg, wqcap & 0xFFFF)
        dev.write32(bar0, wqcfg + 8, 1 | 1 << 4)
        dev.write32(bar0, wqcfg + 12, ((gencap >> 16) & 0x1F) | ((gencap >> 21) & 0xF) << 5)
        dev.write64(bar0, grpcfg, 1)
        dev.write64(bar0, grpcfg + 32, 1)
        return self._command(IDXD_CMD_ENABLE_DEVICE) and self._command(IDXD_CMD_ENABLE_WQ, 0)

    def submit(self, s: int) -> None:
        vm, view, mb = self.vm, self.vm.view, self.vm.mailbox
        seq, pairs, xfer = self.next_seq, mb["pairs"], mb["xfer"]
        self.next_seq += 1
        pat = pattern(seq)
        fill = struct.pack("<Q", pat) * (xfer // 8)
        lst = self.desc_list(s)
        for p in range(pairs):
            src, dst = self.buffer(s, p, 0), self.buffer(s, p, 1)
            view[src:src + xfer] = fill
            struct.pack_into("<Q", view, dst, ~pat & MASK)
            view[lst + 2 * p * 64:lst + (2 * p + 1) * 64] = pack_desc(
                opcode=DSA_OPCODE_MEMMOVE, flags=IDXD_OP_FLAG_CRAV, completion_addr=self.member_record(s, 2 * p),
                src=src, dst=dst, xfer_size=xfer)
            view[lst + (2 * p + 1) * 64:lst + (2 * p + 2) * 64] = pack_desc(
                opcode=DSA_OPCODE_COMPVAL, flags=IDXD_OP_FLAG_CRAV | IDXD_OP_FLAG_FENCE | IDXD_OP_FLAG_CR,
                completion_addr=self.member_record(s, 2 * p + 1), src=dst, dst=pat, xfer_size=xfer)
        for i in range(2 * pairs):
            view[self.member_record(s, i)] = 0
        view[self.batch_record(s)] = 0
        self.slot_seq[s] = seq
        vm.dev.region_write(VFIO_PCI_BAR2_REGION_INDEX, 0, pack_desc(
            opcode=DSA_OPCODE_BATCH, flags=IDXD_OP_FLAG_CRAV | IDXD_OP_FLAG_RCR,
            completion_addr=self.batch_record(s), src=lst, xfer_size=2 * pairs))
        mb["submitted"] += 1
        mb["inflight"] += 1

    def reap(self, s: int) -> None:
        view, mb = self.vm.view, self.vm.mailbox
        status = view[self.batch_record(s)]
        if status == DSA_COMP_SUCCESS:
            mb["descs_ok"] += 2 * mb["pairs"]
        else:
            mb["errors"] += 1
            mb["last_error"] = status
            mb["verify_failures"] += sum(view[self.member_record(s, 2 * i + 1)] == DSA_COMP_SUCCESS_PRED
                                         for i in range(mb["pairs"]))
        mb["completed"] += 1
        mb["inflight"] -= 1
        self.slot_seq[s] = 0

    def step(self) -> None:
        """One turn of the firmware's main loop."""
        mb, view = self.vm.mailbox, self.vm.view
        if mb["state"] == 0:
            mb["state"] = 1
            if mb["init_device"] and not self.init_device():
                mb["state"] = 3
                return
            mb["state"] = 2
        if mb["state"] != 2:
            mb["heartbeat"] += 1
            return
        for s in range(min(mb["slots"], MAX_SLOTS)):
            if self.slot_seq[s] == 0:
                self.submit(s)
            elif view[self.batch_record(s)]:
                self.reap(s)
        mb["heartbeat"] += 1

    # --- registers ------------------------------------------------------------------------------

    def save(self) -> dict:
        return {"slot_seq": list(self.slot_seq), "next_seq": self.next_seq}

    def restore(self, saved: dict) -> None:
        self.slot_seq = list(saved["slot_seq"])
        self.next_seq = int(saved["next_seq"])

    def paused(self) -> None:
        """Nothing measured in guest RAM (the emulated host's bus observer measures a DSA's gaps)."""

    def device_reset(self) -> int:
        """The device came back reset: initialise it again, as at boot (the
        batches in flight are lost with its state, and reported so)."""
        self.vm.mailbox["state"] = 0
        return 0

    def kick(self) -> None:
        """Nothing to interrupt: the loop checks for a pause at every turn."""

    def close(self) -> None:
        pass
