"""The synthetic guest's driver for QEMU's edu (devices/edu_regs.py): the
lab's passthrough device, driven from the host side like the DSA workload
of vmm/synthetic.py, in guest memory and through the device's regions.

Its work loop moves a pattern through the device and back, one transfer at
a time, and verifies it: fill a source buffer with the transfer's pattern,
DMA it into the device's buffer (EDU_CMD_DMA_TO), DMA that back into a
destination buffer (EDU_CMD_DMA_FROM), compare.  Each transfer is a
"batch" of the mailbox (submitted, completed, descs_ok, verify_failures):
the same counters the VMM's report and metrics read for a DSA.  Its
interrupt is the device's one MSI vector (luvmm.vmm.passthrough arms it); a turn
waits for it, bounded, and reads the command register either way.

What it keeps in guest RAM -- the mailbox, and the record at DMA_BASE
(luvmm.vmm.guest.EduRecord, which the firmware's edu driver keeps too) --
crosses a live update with the RAM memfd, so its counters go on where they
were; its "registers" (the phase of the transfer
in flight) go into the machine state like a vCPU's.  The record also holds
what a real host can measure without an observer on the bus: the largest
gap between two heartbeats and between two completed transfers, from the
CLOCK_REALTIME stamps the driver takes (the VMM clears the two maxima when
it pauses the guest), and how many transfers were redone.

When the kernel did not preserve the device, the VMM opens it again after
the kexec (luvmm.vmm.passthrough.Passthrough.rewire) and tells the driver
(:meth:`SyntheticEduCpu.device_reset`), as a PCI driver's reset_done
handler is told: the transfer in flight was lost with the device's state,
and is done again from its start -- counted in ``redone``, never as
corrupted.
"""

from __future__ import annotations

import os
import struct
import time

from luvmm.devices.edu_regs import (
    EDU_CMD_DMA_FROM,
    EDU_CMD_DMA_IRQ,
    EDU_CMD_DMA_START,
    EDU_CMD_DMA_TO,
    EDU_DMA_MASK,
    EDU_DMA_START,
    EDU_ID,
    EDU_REG_ALIVE,
    EDU_REG_DMA_CMD,
    EDU_REG_DMA_COUNT,
    EDU_REG_DMA_DST,
    EDU_REG_DMA_SRC,
    EDU_REG_ID,
    EDU_REG_INTR_ACK,
    EDU_REG_INTR_STATUS,
)
from luvmm.uapi.vfio import VFIO_PCI_BAR0_REGION_INDEX
from luvmm.vmm import guest
from luvmm.vmm.guest import EduRecord
from luvmm.vmm.synthetic import MASK, pattern

IRQ_WAIT_S = guest.IRQ_WAIT_S
BAR0 = VFIO_PCI_BAR0_REGION_INDEX
XFER, SRC_OFFSET, DST_OFFSET = guest.EDU_XFER, guest.EDU_SRC_OFFSET, guest.EDU_DST_OFFSET
IDLE, TO_DEVICE, FROM_DEVICE = guest.EDU_IDLE, guest.EDU_TO_DEVICE, guest.EDU_FROM_DEVICE


class SyntheticEduCpu:
    id = 0

    def __init__(self, vm):
        self.vm = vm
        self.phase = IDLE
        self.seq = 0
        self.next_seq = 1
        self.redo = False
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    # --- the device -----------------------------------------------------------------------------

    def _dev(self):
        return self.vm.dev

    def _start(self, src: int, dst: int, direction: int) -> None:
        dev = self._dev()
        dev.write64(BAR0, EDU_REG_DMA_SRC, src)
        dev.write64(BAR0, EDU_REG_DMA_DST, dst)
        dev.write64(BAR0, EDU_REG_DMA_COUNT, XFER)
        dev.write64(BAR0, EDU_REG_DMA_CMD, EDU_CMD_DMA_START | EDU_CMD_DMA_IRQ | direction)

    def _wait_done(self) -> bool:
        """Whether the transfer under way is done (after waiting for its
        interrupt at most IRQ_WAIT_S); acknowledges the interrupt."""
        self.vm.device.wait_interrupt(IRQ_WAIT_S, self.wake_fd)
        dev = self._dev()
        if dev.read32(BAR0, EDU_REG_DMA_CMD) & EDU_CMD_DMA_START:
            return False
        status = dev.read32(BAR0, EDU_REG_INTR_STATUS)
        if status:
            dev.write32(BAR0, EDU_REG_INTR_ACK, status)
        return True

    def init_device(self) -> bool:
        dev, mb = self._dev(), self.vm.mailbox
        ident = dev.read32(BAR0, EDU_REG_ID)
        if ident != EDU_ID:
            mb["init_error"] = ident
            return False
        dev.write32(BAR0, EDU_REG_ALIVE, 0x4C55564D)
        if dev.read32(BAR0, EDU_REG_ALIVE) != ~0x4C55564D & 0xFFFFFFFF:
            mb["init_error"] = 0xA11E
            return False
        return True

    # --- the workload ---------------------------------------------------------------------------

    def _buffers(self) -> tuple[int, int]:
        return guest.DMA_BASE + SRC_OFFSET, guest.DMA_BASE + DST_OFFSET

    def _submit(self) -> None:
        view, mb, rec = self.vm.view, self.vm.mailbox, EduRecord(self.vm.view)
        if not self.redo:
            self.seq, self.next_seq = self.next_seq, self.next_seq + 1
            mb["submitted"] += 1
            mb["inflight"] += 1
        self.redo = False
        src, dst = self._buffers()
        pat = pattern(self.seq)
        view[src:src + XFER] = struct.pack("<Q", pat) * (XFER // 8)
        view[dst:dst + XFER] = struct.pack("<Q", ~pat & MASK) * (XFER // 8)
        rec["seq_in_flight"] = self.seq
        self.phase = rec["phase"] = TO_DEVICE
        self._start(src & EDU_DMA_MASK, EDU_DMA_START, EDU_CMD_DMA_TO)

    def _complete(self) -> None:
        view, mb, rec = self.vm.view, self.vm.mailbox, EduRecord(self.vm.view)
        src, dst = self._buffers()
        if view[dst:dst + XFER] == view[src:src + XFER]:
            mb["descs_ok"] += 2  # the two transfers, to the device and back
        else:
            mb["errors"] += 1
            mb["verify_failures"] += 1
            mb["last_error"] = self.seq
        mb["completed"] += 1
        mb["inflight"] -= 1
        now = time.time_ns()
        last = rec["last_completion_ns"]
        if last and now - last > rec["max_completion_gap_ns"]:
            rec["max_completion_gap_ns"] = now - last
        rec["last_completion_ns"] = now
        rec["seq_in_flight"] = 0
        self.phase = rec["phase"] = IDLE

    def step(self) -> None:
        """One turn of the driver's loop."""
        mb, rec = self.vm.mailbox, EduRecord(self.vm.view)
        if mb["state"] == 0:
            mb["state"] = 1
            if not self.init_device():
                mb["state"] = 3
                return
            mb["state"] = 2
        if mb["state"] == 2:
            if self.phase == IDLE:
                self._submit()
            elif self._wait_done():
                if self.phase == TO_DEVICE:
                    src, dst = self._buffers()
                    self.phase = rec["phase"] = FROM_DEVICE
                    self._start(EDU_DMA_START, dst & EDU_DMA_MASK, EDU_CMD_DMA_FROM)
                else:
                    self._complete()
        now = time.time_ns()
        last = rec["last_heartbeat_ns"]
        if last and now - last > rec["max_heartbeat_gap_ns"]:
            rec["max_heartbeat_gap_ns"] = now - last
        rec["last_heartbeat_ns"] = now
        mb["heartbeat"] += 1

    def paused(self) -> None:
        """The VMM paused the guest: the gaps measured from here are the update's."""
        rec = EduRecord(self.vm.view)
        rec["max_heartbeat_gap_ns"] = rec["max_completion_gap_ns"] = 0

    def device_reset(self) -> int:
        """The device came back reset (not preserved by the kernel): the
        transfer in flight is lost with its state; do it again, from the
        start.  Returns how many transfers are done again (0 or 1)."""
        if self.phase == IDLE:
            return 0
        rec = EduRecord(self.vm.view)
        rec["redone"] += 1
        self.redo = True
        self.phase = rec["phase"] = IDLE
        return 1

    # --- registers ------------------------------------------------------------------------------

    def save(self) -> dict:
        return {"driver": "edu", "phase": self.phase, "seq": self.seq, "next_seq": self.next_seq, "redo": self.redo}

    def restore(self, saved: dict) -> None:
        self.phase, self.seq = int(saved["phase"]), int(saved["seq"])
        self.next_seq, self.redo = int(saved["next_seq"]), bool(saved.get("redo"))

    def kick(self) -> None:
        """Wake a turn waiting for the interrupt: a pause is not held up by it."""
        os.eventfd_write(self.wake_fd, 1)

    def close(self) -> None:
        if self.wake_fd >= 0:
            os.close(self.wake_fd)
            self.wake_fd = -1

