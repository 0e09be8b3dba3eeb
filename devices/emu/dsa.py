"""An emulated Intel Data Streaming Accelerator, as the idxd driver and the
VFIO selftests' DSA driver see one.

Software configures it through BAR0 (capabilities, GRPCFG/WQCFG tables, the
CMD/CMDSTS command interface, SWERR, MSI-X) and submits 64-byte descriptors
by writing them to a work queue's portal in BAR2.  The device reads its
operands from, and writes results and completion records to, IOVAs that it
translates through the IOMMU domain it is attached to.

The engines run in a thread of their own.  That is deliberate: the device is
hardware, and it must keep processing its work queues whatever the emulated
kernel is doing -- serving ioctls, serializing a KHO image, or being torn
down and rebuilt by a kexec.  Copies run in ``ctypes.memmove``, which releases
the GIL, so a 1 GiB copy uses the other core and the host daemon stays
responsive.  The optional bandwidth models a device slow enough that work
submitted before a live update is still completing during its blackout.

What the model does, and the status it reports (include/uapi/linux/idxd.h):

* Descriptor checks, in order: reserved flag bits, RCR without CRAV, BOF
  (unsupported: no page-request interface) -> INVALID_FLAGS; a completion
  record address not 32-byte aligned -> CRA_ALIGN (software error, no record
  can be written); RCI with an int_handle beyond the MSI-X vectors ->
  INT_HANDLE_INVAL; an opcode not in OPCAP -> BAD_OPCODE; a transfer size of 0
  or above the WQ's max_xfer_shift -> XFER_ERANGE.
* A completion record is written when RCR is set, or on error when CRAV is
  set (status last, so a poller never sees a half-written record); an error
  with no record to go to is latched in SWERR.  RCI raises the MSI-X vector
  named by int_handle.
* A translation miss or permission violation stops the operation at the
  faulting address: PAGE_FAULT_NOBOF (| 0x80 for a write) with
  bytes_completed and fault_addr, so software resumes the rest.  A fault on
  the completion record itself is CRA_XLAT in SWERR.
* BATCH: 2..(1 << max_batch_shift) descriptors (DESC_CNT_ERANGE), list 64-byte
  aligned (DESCLIST_ALIGN), no BATCH inside a batch (BAD_OPCODE); status
  SUCCESS when every descriptor succeeded, else BATCH_FAIL; a FENCE after a
  failure (including a false predicate) abandons the rest; a fault reading
  the list is BATCH_PAGE_FAULT.  descs_completed counts what was processed.
* CR_DELTA/AP_DELTA work on 8-byte words: addresses and size must be
  8-byte aligned (ADDR_ALIGN); a record entry is (u16 word offset, u64 word);
  a record that does not fit max_delta_size gives result 2, a malformed one
  DR_ERANGE, DR_OFFSET_NOINC or DR_OFFSET_ERANGE (checked before any write).
* COMPARE/COMPVAL: result 0 equal, 1 different (bytes_completed = offset of
  the first difference); with CR, a result other than expected_res is
  SUCCESS_PRED.  DUALCAST needs dst1 and dst2 equal in bits 11:0
  (DCAST_ERR) and no overlap (OVERLAP_BUFFERS).  CRCGEN/COPY_CRC compute
  CRC-32C (RFC 3720) continuing from crc_seed, into crc_val.
* Bus Master Enable clear: no DMA at all; queued and in-flight work waits.
  RESET_DEV, ABORT_*, RESET_WQ and FLR abort queued and in-flight work (no
  completion records for aborted descriptors).
* All work queues feed one engine pipeline in submission order (WQ priority
  and the number of engines do not change the order of completion).

Why this long: the device is one class, DsaDevice -- its registers, work
queues, engine and operations share one lock and one register file. Splitting
it by concern is still to do (issue 25, item 3).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import struct
import threading
import time
from dataclasses import dataclass, field

import crc32c

from luvmm.devices.dsa_regs import (
    BAR0_SIZE,
    BAR2_SIZE,
    DEVICE_VERSION_1,
    GENCAP_BLOCK_ON_FAULT,
    GENCTRL_HALT_INT_EN,
    GENCTRL_SOFTERR_INT_EN,
    GRPCFG_SIZE,
    IDXD_CMD_ABORT_ALL,
    IDXD_CMD_ABORT_WQ,
    IDXD_CMD_DISABLE_DEVICE,
    IDXD_CMD_DISABLE_WQ,
    IDXD_CMD_DRAIN_ALL,
    IDXD_CMD_DRAIN_WQ,
    IDXD_CMD_ENABLE_DEVICE,
    IDXD_CMD_ENABLE_WQ,
    IDXD_CMD_OFFSET,
    IDXD_CMD_RESET_DEVICE,
    IDXD_CMD_RESET_WQ,
    IDXD_CMDCAP_OFFSET,
    IDXD_CMDSTS_ACTIVE,
    IDXD_CMDSTS_ERR_BOF_EN,
    IDXD_CMDSTS_ERR_BUSMASTER_EN,
    IDXD_CMDSTS_ERR_CONFIG,
    IDXD_CMDSTS_ERR_DEV_ENABLED,
    IDXD_CMDSTS_ERR_DEV_NOT_EN,
    IDXD_CMDSTS_ERR_DEV_NOTEN,
    IDXD_CMDSTS_ERR_DIS_DEV_EN,
    IDXD_CMDSTS_ERR_GRP_CONFIG,
    IDXD_CMDSTS_ERR_GRP_CONFIG2,
    IDXD_CMDSTS_ERR_GRP_CONFIG3,
    IDXD_CMDSTS_ERR_MAX_BATCH_SIZE,
    IDXD_CMDSTS_ERR_MAX_XFER_SIZE,
    IDXD_CMDSTS_ERR_PASID_EN,
    IDXD_CMDSTS_ERR_WQ_ENABLED,
    IDXD_CMDSTS_ERR_WQ_MODE,
    IDXD_CMDSTS_ERR_WQ_PRIOR,
    IDXD_CMDSTS_ERR_WQ_SIZE,
    IDXD_CMDSTS_ERR_WQ_SIZE_ERANGE,
    IDXD_CMDSTS_INVAL_CMD,
    IDXD_CMDSTS_INVAL_WQIDX,
    IDXD_CMDSTS_OFFSET,
    IDXD_CMDSTS_RES_SHIFT,
    IDXD_DEVICE_STATE_DISABLED,
    IDXD_DEVICE_STATE_ENABLED,
    IDXD_ENGCAP_OFFSET,
    IDXD_GENCAP_OFFSET,
    IDXD_GENCFG_OFFSET,
    IDXD_GENCTRL_OFFSET,
    IDXD_GENSTATS_OFFSET,
    IDXD_GRPCAP_OFFSET,
    IDXD_INTC_CMD,
    IDXD_INTC_ERR,
    IDXD_INTCAUSE_OFFSET,
    IDXD_MMIO_BAR,
    IDXD_OPCAP_OFFSET,
    IDXD_PORTAL_SIZE,
    IDXD_PORTALS_PER_WQ,
    IDXD_SWERR_ACK,
    IDXD_SWERR_OFFSET,
    IDXD_SWERR_OVERFLOW,
    IDXD_SWERR_VALID,
    IDXD_TABLE_OFFSET,
    IDXD_VER_OFFSET,
    IDXD_WQ_BAR,
    IDXD_WQCAP_OFFSET,
    PCI_CLASS_SYSTEM_OTHER,
    PCI_DEVICE_ID_INTEL_DSA_SPR0,
    PCI_VENDOR_ID_INTEL,
    SWERR_BATCH,
    SWERR_DESC_VALID,
    SWERR_ERROR_SHIFT,
    SWERR_FAULT_RW,
    SWERR_OPERATION_SHIFT,
    SWERR_PORTAL_WRITE_SIZE,
    SWERR_WQ_DISABLED,
    SWERR_WQ_FULL,
    SWERR_WQ_IDX_SHIFT,
    SWERR_WQ_IDX_VALID,
    WQCFG_BOF,
    WQCFG_MODE_DEDICATED,
    WQCFG_OCCUP_IDX,
    WQCFG_PASID_EN,
    WQCFG_PRIORITY_SHIFT,
    WQCFG_SIZE,
    WQCFG_STATE_ENABLED,
    WQCFG_STATE_SHIFT,
)
from luvmm.devices.emu.dsa_model import (
    CMDCAP_VALUE,
    ENGCAP_VALUE,
    GENCAP_VALUE,
    GRPCAP_VALUE,
    GRPCFG_TABLE,
    MAX_BATCH_SHIFT,
    MAX_XFER_SHIFT,
    MSIX_PBA,
    MSIX_TABLE,
    MSIX_VECTORS,
    NUM_ENGINES,
    NUM_GROUPS,
    NUM_WQS,
    OPCAP_SUPPORTED,
    TABLE_OFFSET_VALUE,
    TOTAL_WQ_SIZE,
    WQCAP_VALUE,
    WQCFG_TABLE,
)
from luvmm.uapi.idxd import (
    COMP,
    DESC,
    DSA_COMP_ADDR_ALIGN,
    DSA_COMP_BAD_OPCODE,
    DSA_COMP_BATCH_FAIL,
    DSA_COMP_BATCH_PAGE_FAULT,
    DSA_COMP_CRA_ALIGN,
    DSA_COMP_CRA_XLAT,
    DSA_COMP_DCAST_ERR,
    DSA_COMP_DESC_CNT_ERANGE,
    DSA_COMP_DESCLIST_ALIGN,
    DSA_COMP_DR_ERANGE,
    DSA_COMP_DR_OFFSET_ERANGE,
    DSA_COMP_DR_OFFSET_NOINC,
    DSA_COMP_HW_ERR1,
    DSA_COMP_INT_HANDLE_INVAL,
    DSA_COMP_INVALID_FLAGS,
    DSA_COMP_OVERLAP_BUFFERS,
    DSA_COMP_PAGE_FAULT_NOBOF,
    DSA_COMP_STATUS_MASK,
    DSA_COMP_STATUS_WRITE,
    DSA_COMP_SUCCESS,
    DSA_COMP_SUCCESS_PRED,
    DSA_COMP_XFER_ERANGE,
    DSA_DESC_SIZE,
    DSA_OPCODE_AP_DELTA,
    DSA_OPCODE_BATCH,
    DSA_OPCODE_COMPARE,
    DSA_OPCODE_COMPVAL,
    DSA_OPCODE_CR_DELTA,
    DSA_OPCODE_CRCGEN,
    DSA_OPCODE_DRAIN,
    DSA_OPCODE_DUALCAST,
    DSA_OPCODE_MEMFILL,
    DSA_OPCODE_MEMMOVE,
    DSA_OPCODE_NOOP,
    IDXD_OP_FLAG_BOF,
    IDXD_OP_FLAG_CC,
    IDXD_OP_FLAG_CR,
    IDXD_OP_FLAG_CRAV,
    IDXD_OP_FLAG_FENCE,
    IDXD_OP_FLAG_RCI,
    IDXD_OP_FLAG_RCR,
    OP_CRC,
    OP_DELTA,
    OP_U64,
)
from luvmm.devices.emu.iommu import DmaFault, IommuDomain
from luvmm.devices.emu.pci import Bar, PciFunction

log = logging.getLogger(__name__)

#: Flags this device accepts: bits 0-15 of the descriptor's flags field.
VALID_FLAGS = 0xFFFF
#: A chunk of data movement between checks for abort, Bus Master Enable and pacing.
CHUNK = 1 << 20

#: Delta records address 8-byte words with a 16-bit offset.
DELTA_MAX_XFER = 0x80000
DELTA_ENTRY = struct.Struct("<HQ")
OP_U32 = struct.Struct("<I")

_memmove = ctypes.memmove
_u64 = struct.Struct("<Q")


# Descriptor flags|opcode word of a MEMMOVE with CRAV and at most FENCE/CC
# besides: what the batch fast path handles.
_FAST_MASK = 0xFF000000 | (0xFFFFFF & ~(IDXD_OP_FLAG_FENCE | IDXD_OP_FLAG_CC))
_FAST_MEMMOVE = DSA_OPCODE_MEMMOVE << 24 | IDXD_OP_FLAG_CRAV


class _Aborted(Exception):
    """The descriptor in flight was aborted (reset, abort command, FLR, shutdown)."""


@dataclass
class WorkQueue:
    id: int
    enabled: bool = False
    size: int = 0
    max_xfer: int = 0
    max_batch: int = 0
    occupancy: int = 0


@dataclass
class Outcome:
    """What an operation did: the completion record fields."""

    status: int = DSA_COMP_SUCCESS
    result: int = 0
    completed: int = 0  # bytes_completed or descs_completed
    fault_addr: int = 0
    extra: bytes = b""  # op-specific bytes 16..31 (crc_val, invalid_flags)


@dataclass
class DsaStats:
    descriptors: int = 0  # descriptors completed (batch members included)
    batches: int = 0
    bytes: int = 0  # bytes read or written by data operations
    faults: int = 0
    errors: int = 0  # completions with an error status
    aborted: int = 0
    dropped_submissions: int = 0
    by_status: collections.Counter = field(default_factory=collections.Counter)


COMPLETION_HISTORY = 1 << 18


class DsaDevice(PciFunction):
    """One DSA function.  Call :meth:`start` to run its engines."""

    def __init__(self, bdf: str, *, bandwidth: float | None = None):
        super().__init__(bdf, vendor=PCI_VENDOR_ID_INTEL, device=PCI_DEVICE_ID_INTEL_DSA_SPR0,
                         class_code=PCI_CLASS_SYSTEM_OTHER, revision=1,
                         bars=[Bar(IDXD_MMIO_BAR, BAR0_SIZE), Bar(IDXD_WQ_BAR, BAR2_SIZE)],
                         msix_vectors=MSIX_VECTORS, msix_bar=IDXD_MMIO_BAR, msix_table=MSIX_TABLE,
                         msix_pba=MSIX_PBA, subsystem_vendor=PCI_VENDOR_ID_INTEL,
                         subsystem=PCI_DEVICE_ID_INTEL_DSA_SPR0)
        #: Transfer bytes per second the engines process (a 1 GiB MEMMOVE at
        #: 1 GiB/s takes a second), or None for as fast as memcpy.
        self.bandwidth = bandwidth
        self.domain: IommuDomain | None = None
        self.stats = DsaStats()
        self.cond = threading.Condition(self.lock)
        self.regs = bytearray(BAR0_SIZE)
        self.wqs = [WorkQueue(i) for i in range(NUM_WQS)]
        self._queue: collections.deque = collections.deque()  # (wq, seq, raw descriptor)
        self._seq = 0
        self._current: tuple[WorkQueue, int] | None = None
        self._abort_gen = 0
        self._pending_cmd = None
        self._pending_check = None
        self._group_of: dict[int, int] = {}
        self._stop = False
        self._bme = False  # Bus Master Enable, cached for the engines' hot path
        self._thread: threading.Thread | None = None
        self._vtime = 0.0
        self.internal_errors = 0
        #: When each top-level descriptor completed (CLOCK_REALTIME): what an
        #: observer on the bus sees, whatever the software above is doing.
        #: (Bounded: about 9 minutes of history at 500 completions/s, ~30 MB at most.)
        self.completion_times: collections.deque[float] = collections.deque(maxlen=COMPLETION_HISTORY)
        #: (completion time, bytes moved so far) at each of them: DMA throughput over time.
        self.completion_bytes: collections.deque[tuple[float, int]] = collections.deque(maxlen=COMPLETION_HISTORY)
        self._reset_registers()

    # --- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Power on the engines."""
        with self.lock:
            if self._thread is not None:
                return
            self._stop = False
            self._thread = threading.Thread(target=self._engine, name=f"dsa-{self.bdf}", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Power off: abort everything and stop the engines."""
        with self.cond:
            self._stop = True
            self._abort_gen += 1
            self.cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def attach_domain(self, domain: IommuDomain | None) -> None:
        """Point the device's requester ID at an IOMMU domain (None blocks DMA)."""
        with self.lock:
            self.domain = domain

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no descriptor is queued or in flight (tests, benchmarks)."""
        with self.cond:
            return self.cond.wait_for(lambda: not self._queue and self._current is None, timeout)

    @property
    def enabled(self) -> bool:
        return self._gensts() == IDXD_DEVICE_STATE_ENABLED

    def summary(self) -> dict:
        with self.lock:
            return {
                "bdf": self.bdf, "enabled": self.enabled, "bus_master": self.bus_master,
                "wqs_enabled": [wq.id for wq in self.wqs if wq.enabled],
                "queued": len(self._queue) + (self._current is not None),
                "descriptors": self.stats.descriptors, "bytes": self.stats.bytes, "faults": self.stats.faults,
                "errors": self.stats.errors, "interrupts": sum(self.msix.delivered),
                "by_status": {f"{k:#x}": v for k, v in self.stats.by_status.items()},
                "dropped_submissions": self.stats.dropped_submissions, "aborted": self.stats.aborted,
                "interrupts_pending": bin(self.msix.pending).count("1"),
            }

    # --- registers ---------------------------------------------------------------------------

    def _reg(self, offset: int, fmt: str = "<Q") -> int:
        return struct.unpack_from(fmt, self.regs, offset)[0]

    def _set_reg(self, offset: int, value: int, fmt: str = "<Q") -> None:
        struct.pack_into(fmt, self.regs, offset, value)

    def _gensts(self) -> int:
        return self._reg(IDXD_GENSTATS_OFFSET, "<I") & 3

    def _reset_registers(self) -> None:
        regs = self.regs
        regs[:] = bytes(len(regs))
        self._set_reg(IDXD_VER_OFFSET, DEVICE_VERSION_1, "<I")
        self._set_reg(IDXD_GENCAP_OFFSET, GENCAP_VALUE)
        self._set_reg(IDXD_WQCAP_OFFSET, WQCAP_VALUE)
        self._set_reg(IDXD_GRPCAP_OFFSET, GRPCAP_VALUE)
        self._set_reg(IDXD_ENGCAP_OFFSET, ENGCAP_VALUE)
        self._set_reg(IDXD_OPCAP_OFFSET, OPCAP_SUPPORTED)
        self._set_reg(IDXD_TABLE_OFFSET, TABLE_OFFSET_VALUE)
        self._set_reg(IDXD_CMDCAP_OFFSET, CMDCAP_VALUE, "<I")
        self._group_of = {}
        for wq in self.wqs:
            wq.enabled, wq.size, wq.max_xfer, wq.max_batch, wq.occupancy = False, 0, 0, 0, 0

    def mmio_read(self, index: int, offset: int, size: int) -> bytes:
        if index != IDXD_MMIO_BAR:
            return bytes(size)  # portals read as zero
        with self.lock:
            return bytes(self.regs[offset:offset + size])

    def mmio_write(self, index: int, offset: int, data: bytes) -> None:
        if index == IDXD_WQ_BAR:
            self.portal_write(offset, data)
            return
        with self.cond:
            self._register_write(offset, data)

    def _register_write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        enabled = self.enabled
        if offset <= IDXD_CMD_OFFSET < end:
            if offset == IDXD_CMD_OFFSET and len(data) >= 4:
                self._command(struct.unpack_from("<I", data)[0])
            return
        if offset <= IDXD_SWERR_OFFSET < end:
            if offset == IDXD_SWERR_OFFSET:
                word = self._reg(IDXD_SWERR_OFFSET) & ~(data[0] & IDXD_SWERR_ACK)
                if not word & IDXD_SWERR_VALID:
                    self.regs[IDXD_SWERR_OFFSET:IDXD_SWERR_OFFSET + 32] = bytes(32)
                else:
                    self._set_reg(IDXD_SWERR_OFFSET, word)
            return
        if offset == IDXD_INTCAUSE_OFFSET:  # write 1 to clear
            cause = self._reg(IDXD_INTCAUSE_OFFSET, "<I") & ~int.from_bytes(data[:4].ljust(4, b"\0"), "little")
            self._set_reg(IDXD_INTCAUSE_OFFSET, cause, "<I")
            return
        if offset == IDXD_GENCTRL_OFFSET:
            mask = GENCTRL_SOFTERR_INT_EN | GENCTRL_HALT_INT_EN
            self._set_reg(IDXD_GENCTRL_OFFSET, int.from_bytes(data[:4].ljust(4, b"\0"), "little") & mask, "<I")
            return
        if offset == IDXD_GENCFG_OFFSET and not enabled:
            self.regs[offset:offset + min(len(data), 8)] = data[:8]
            return
        if GRPCFG_TABLE <= offset and end <= GRPCFG_TABLE + NUM_GROUPS * GRPCFG_SIZE:
            if not enabled:  # group configuration is locked while the device is enabled
                self.regs[offset:end] = data
            return
        if WQCFG_TABLE <= offset and end <= WQCFG_TABLE + NUM_WQS * WQCFG_SIZE:
            wq = self.wqs[(offset - WQCFG_TABLE) // WQCFG_SIZE]
            dword = (offset - WQCFG_TABLE) % WQCFG_SIZE // 4
            if not wq.enabled and dword < WQCFG_OCCUP_IDX and end <= WQCFG_TABLE + (wq.id + 1) * WQCFG_SIZE:
                self.regs[offset:end] = data
            return
        # Everything else is read-only.

    def _wqcfg(self, wq: int, dword: int) -> int:
        return self._reg(WQCFG_TABLE + wq * WQCFG_SIZE + 4 * dword, "<I")

    def _set_wqcfg(self, wq: int, dword: int, value: int) -> None:
        self._set_reg(WQCFG_TABLE + wq * WQCFG_SIZE + 4 * dword, value, "<I")

    def _update_wq_status(self, wq: WorkQueue) -> None:
        state = WQCFG_STATE_ENABLED if wq.enabled else 0
        self._set_wqcfg(wq.id, WQCFG_OCCUP_IDX, (wq.occupancy & 0xFFFF) | state << WQCFG_STATE_SHIFT)

    # --- commands ------------------------------------------------------------------------------

    def _command(self, value: int) -> None:
        if self._reg(IDXD_CMDSTS_OFFSET, "<I") & IDXD_CMDSTS_ACTIVE:
            return  # software must wait for the previous command
        operand, cmd, int_req = value & 0xFFFFF, (value >> 20) & 0x1F, bool(value >> 31)
        self._set_reg(IDXD_CMDSTS_OFFSET, IDXD_CMDSTS_ACTIVE, "<I")
        handler = {
            IDXD_CMD_ENABLE_DEVICE: self._cmd_enable_device,
            IDXD_CMD_DISABLE_DEVICE: self._cmd_disable_device,
            IDXD_CMD_DRAIN_ALL: self._cmd_drain_all,
            IDXD_CMD_ABORT_ALL: self._cmd_abort_all,
            IDXD_CMD_RESET_DEVICE: self._cmd_reset_device,
            IDXD_CMD_ENABLE_WQ: self._cmd_enable_wq,
            IDXD_CMD_DISABLE_WQ: self._cmd_wq_op,
            IDXD_CMD_DRAIN_WQ: self._cmd_wq_op,
            IDXD_CMD_ABORT_WQ: self._cmd_wq_op,
            IDXD_CMD_RESET_WQ: self._cmd_wq_op,
        }.get(cmd)
        if handler is None:
            self._finish_command(IDXD_CMDSTS_INVAL_CMD, int_req)
            return
        err = handler(cmd, operand)
        if err is None:  # completes when the engines reach the condition
            self._pending_cmd = (cmd, int_req)
            self._check_pending_command()
        else:
            self._finish_command(err, int_req)

    def _finish_command(self, err: int, int_req: bool, result: int = 0) -> None:
        self._pending_cmd = None
        self._pending_check = None
        self._set_reg(IDXD_CMDSTS_OFFSET, err | (result & 0xFFFF) << IDXD_CMDSTS_RES_SHIFT, "<I")
        if int_req:
            self._interrupt_misc(IDXD_INTC_CMD)
        self.cond.notify_all()

    def _check_pending_command(self) -> None:
        """Complete a deferred command whose condition now holds (lock held)."""
        if self._pending_cmd is None:
            return
        done, then = self._pending_check
        if done():
            cmd, int_req = self._pending_cmd
            if then is not None:
                then()
            self._finish_command(0, int_req)

    def _defer(self, done, then=None) -> None:
        self._pending_check = (done, then)

    def _wq_set(self, operand: int) -> set[int] | int:
        base = ((operand >> 16) & 0xF) * 16
        ids = {base + bit for bit in range(16) if operand & (1 << bit)}
        if not ids or max(ids) >= NUM_WQS:
            return IDXD_CMDSTS_INVAL_WQIDX
        return ids

    def _drained(self, wq_ids: set[int] | None, upto: int):
        def done() -> bool:
            if self._current is not None and self._current[1] <= upto and \
                    (wq_ids is None or self._current[0].id in wq_ids):
                return False
            return not any(seq <= upto and (wq_ids is None or wq.id in wq_ids) for wq, seq, _ in self._queue)
        return done

    def _quiesced(self, wq_ids: set[int] | None):
        return lambda: self._current is None or (wq_ids is not None and self._current[0].id not in wq_ids)

    def _abort(self, wq_ids: set[int] | None) -> None:
        kept = collections.deque()
        for entry in self._queue:
            if wq_ids is None or entry[0].id in wq_ids:
                entry[0].occupancy -= 1
                self.stats.aborted += 1
            else:
                kept.append(entry)
        self._queue = kept
        if self._current is not None and (wq_ids is None or self._current[0].id in wq_ids):
            self._abort_gen += 1
        for wq in self.wqs:
            self._update_wq_status(wq)
        self.cond.notify_all()

    def _cmd_enable_device(self, cmd, operand):
        if self.enabled:
            return IDXD_CMDSTS_ERR_DEV_ENABLED
        if not self.bus_master:
            return IDXD_CMDSTS_ERR_BUSMASTER_EN
        owner: dict[int, int] = {}
        for g in range(NUM_GROUPS):
            base = GRPCFG_TABLE + g * GRPCFG_SIZE
            wqs = int.from_bytes(self.regs[base:base + 32], "little")
            engines = self._reg(base + 32)
            if wqs >> NUM_WQS or engines >> NUM_ENGINES:
                return IDXD_CMDSTS_ERR_GRP_CONFIG3
            if wqs and not engines:
                return IDXD_CMDSTS_ERR_GRP_CONFIG2
            for w in range(NUM_WQS):
                if wqs & (1 << w):
                    if w in owner:
                        return IDXD_CMDSTS_ERR_GRP_CONFIG
                    owner[w] = g
        if sum(self._wqcfg(w, 0) & 0xFFFF for w in range(NUM_WQS)) > TOTAL_WQ_SIZE:
            return IDXD_CMDSTS_ERR_WQ_SIZE_ERANGE
        self._group_of = owner
        self._set_reg(IDXD_GENSTATS_OFFSET, IDXD_DEVICE_STATE_ENABLED, "<I")
        self.cond.notify_all()
        return 0

    def _disable_all(self) -> None:
        for wq in self.wqs:
            wq.enabled = False
            self._update_wq_status(wq)
        self._set_reg(IDXD_GENSTATS_OFFSET, IDXD_DEVICE_STATE_DISABLED, "<I")

    def _cmd_disable_device(self, cmd, operand):
        if not self.enabled:
            return IDXD_CMDSTS_ERR_DIS_DEV_EN
        for wq in self.wqs:  # stop accepting work, finish what was accepted
            wq.enabled = False
            self._update_wq_status(wq)
        self._defer(self._drained(None, self._seq), self._disable_all)
        return None

    def _cmd_drain_all(self, cmd, operand):
        self._defer(self._drained(None, self._seq))
        return None

    def _cmd_abort_all(self, cmd, operand):
        self._abort(None)
        self._defer(self._quiesced(None))
        return None

    def _cmd_reset_device(self, cmd, operand):
        self._abort(None)
        self._defer(self._quiesced(None), self._reset_registers)
        return None

    def _cmd_enable_wq(self, cmd, operand):
        if operand >= NUM_WQS:
            return IDXD_CMDSTS_INVAL_WQIDX
        if not self.enabled:
            return IDXD_CMDSTS_ERR_DEV_NOTEN
        wq = self.wqs[operand]
        if wq.enabled:
            return IDXD_CMDSTS_ERR_WQ_ENABLED
        size = self._wqcfg(wq.id, 0) & 0xFFFF
        mode = self._wqcfg(wq.id, 2)
        limits = self._wqcfg(wq.id, 3)
        max_xfer_shift, max_batch_shift = limits & 0x1F, (limits >> 5) & 0xF
        if size == 0:
            return IDXD_CMDSTS_ERR_WQ_SIZE
        if not mode & WQCFG_MODE_DEDICATED:
            return IDXD_CMDSTS_ERR_WQ_MODE  # shared WQs are not implemented
        if (mode >> WQCFG_PRIORITY_SHIFT) & 0xF == 0:
            return IDXD_CMDSTS_ERR_WQ_PRIOR
        if mode & WQCFG_BOF and not GENCAP_VALUE & GENCAP_BLOCK_ON_FAULT:
            return IDXD_CMDSTS_ERR_BOF_EN
        if mode & WQCFG_PASID_EN:
            return IDXD_CMDSTS_ERR_PASID_EN
        if max_batch_shift > MAX_BATCH_SHIFT:
            return IDXD_CMDSTS_ERR_MAX_BATCH_SIZE
        if max_xfer_shift > MAX_XFER_SHIFT:
            return IDXD_CMDSTS_ERR_MAX_XFER_SIZE
        if wq.id not in self._group_of:
            return IDXD_CMDSTS_ERR_CONFIG
        wq.size, wq.max_xfer, wq.max_batch = size, 1 << max_xfer_shift, 1 << max_batch_shift
        wq.enabled = True
        self._update_wq_status(wq)
        return 0

    def _cmd_wq_op(self, cmd, operand):
        ids = self._wq_set(operand)
        if isinstance(ids, int):
            return ids
        if not self.enabled:
            return IDXD_CMDSTS_ERR_DEV_NOT_EN
        if cmd == IDXD_CMD_DRAIN_WQ:
            self._defer(self._drained(ids, self._seq))
        elif cmd == IDXD_CMD_DISABLE_WQ:
            def disable():
                for w in ids:
                    self.wqs[w].enabled = False
                    self._update_wq_status(self.wqs[w])
            for w in ids:  # no new submissions while draining
                self.wqs[w].enabled = False
                self._update_wq_status(self.wqs[w])
            self._defer(self._drained(ids, self._seq), disable)
        elif cmd == IDXD_CMD_ABORT_WQ:
            self._abort(ids)
            self._defer(self._quiesced(ids))
        else:  # RESET_WQ
            self._abort(ids)

            def reset():
                for w in ids:
                    wq = self.wqs[w]
                    wq.enabled, wq.size, wq.max_xfer, wq.max_batch = False, 0, 0, 0
                    base = WQCFG_TABLE + w * WQCFG_SIZE
                    self.regs[base:base + WQCFG_SIZE] = bytes(WQCFG_SIZE)
                    self._update_wq_status(wq)
            self._defer(self._quiesced(ids), reset)
        return None

    # --- PCI -----------------------------------------------------------------------------------

    def command_changed(self, old: int, new: int) -> None:
        with self.cond:
            self._bme = self.bus_master
            self.cond.notify_all()  # Bus Master Enable gates the engines

    def reset_function(self) -> None:
        """FLR: in-flight work is aborted, every register back to its reset value."""
        with self.cond:
            self._abort(None)
            self.cond.wait_for(self._quiesced(None))
            self._pending_cmd = self._pending_check = None
            self._group_of = {}
            self._reset_registers()
            self.cond.notify_all()

    # --- interrupts and software errors ----------------------------------------------------

    def _interrupt_misc(self, cause: int) -> None:
        self._set_reg(IDXD_INTCAUSE_OFFSET, self._reg(IDXD_INTCAUSE_OFFSET, "<I") | cause, "<I")
        self.msix.raise_vector(0)

    def _swerr(self, error: int, *, wq: WorkQueue | None = None, opcode: int | None = None,
               batch: bool = False, fault_addr: int = 0, write: bool = False, invalid_flags: int = 0) -> None:
        with self.lock:
            word = self._reg(IDXD_SWERR_OFFSET)
            if word & IDXD_SWERR_VALID:
                self._set_reg(IDXD_SWERR_OFFSET, word | IDXD_SWERR_OVERFLOW)
                return
            word = IDXD_SWERR_VALID | (error & 0xFF) << SWERR_ERROR_SHIFT
            if wq is not None:
                word |= SWERR_WQ_IDX_VALID | wq.id << SWERR_WQ_IDX_SHIFT
            if opcode is not None:
                word |= SWERR_DESC_VALID | opcode << SWERR_OPERATION_SHIFT
            word |= (SWERR_BATCH if batch else 0) | (SWERR_FAULT_RW if write else 0)
            self._set_reg(IDXD_SWERR_OFFSET, word)
            self._set_reg(IDXD_SWERR_OFFSET + 8, (invalid_flags & 0xFFFFFFFF) << 32)
            self._set_reg(IDXD_SWERR_OFFSET + 16, fault_addr)
            if self._reg(IDXD_GENCTRL_OFFSET, "<I") & GENCTRL_SOFTERR_INT_EN:
                self._interrupt_misc(IDXD_INTC_ERR)

    # --- submission -------------------------------------------------------------------------

    def portal_write(self, offset: int, data: bytes) -> None:
        """A store to BAR2.  A dedicated WQ takes whole 64-byte descriptors
        (MOVDIR64B); anything else, or a store to a disabled or full WQ, is
        dropped and reported in SWERR, as hardware does."""
        wq_index = offset // (IDXD_PORTAL_SIZE * IDXD_PORTALS_PER_WQ)
        with self.cond:
            if wq_index >= NUM_WQS:
                self.stats.dropped_submissions += 1
                self._swerr(SWERR_PORTAL_WRITE_SIZE)
                return
            wq = self.wqs[wq_index]
            if len(data) != DSA_DESC_SIZE or offset % DSA_DESC_SIZE:
                self.stats.dropped_submissions += 1
                self._swerr(SWERR_PORTAL_WRITE_SIZE, wq=wq)
                return
            if not wq.enabled or not self.enabled:
                self.stats.dropped_submissions += 1
                self._swerr(SWERR_WQ_DISABLED, wq=wq, opcode=data[7])
                return
            if wq.occupancy >= wq.size:
                self.stats.dropped_submissions += 1
                self._swerr(SWERR_WQ_FULL, wq=wq, opcode=data[7])
                return
            self._seq += 1
            wq.occupancy += 1
            self._update_wq_status(wq)
            self._queue.append((wq, self._seq, bytes(data)))
            self.cond.notify_all()

    # --- the engines ----------------------------------------------------------------------------

    def _runnable(self) -> bool:
        return bool(self._queue) and self._bme and self.enabled

    def _engine(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self._stop or self._runnable())
                if self._stop:
                    return
                wq, seq, raw = self._queue.popleft()
                self._current = (wq, seq)
                gen = self._abort_gen
            try:
                self._execute(wq, raw, gen)
            except _Aborted:
                with self.lock:  # _abort() counts under the lock too
                    self.stats.aborted += 1
            except Exception:  # a model bug must not kill the device: report it as hardware error
                log.exception("DSA %s: internal error processing a descriptor", self.bdf)
                self.internal_errors += 1
                self._swerr(DSA_COMP_HW_ERR1, wq=wq, opcode=raw[7])
            with self.cond:
                self._current = None
                wq.occupancy = max(0, wq.occupancy - 1)
                self._update_wq_status(wq)
                self._check_pending_command()
                self.cond.notify_all()

    def _dma_gate(self, gen: int) -> None:
        """Between chunks: stop if aborted, wait while Bus Master Enable is clear."""
        if gen != self._abort_gen:
            raise _Aborted
        if not self._bme:
            with self.cond:
                self.cond.wait_for(lambda: gen != self._abort_gen or self._stop or self._bme)
            if gen != self._abort_gen or self._stop:
                raise _Aborted

    def _pace(self, nbytes: int, gen: int) -> None:
        """Model the configured bandwidth: hold the engine until ``nbytes`` would have moved."""
        if not self.bandwidth or nbytes <= 0:
            return
        now = time.monotonic()
        self._vtime = max(self._vtime, now) + nbytes / self.bandwidth
        if self._vtime > now:
            with self.cond:
                self.cond.wait_for(lambda: gen != self._abort_gen or self._stop, self._vtime - now)
            if gen != self._abort_gen:
                raise _Aborted

    def _execute(self, wq: WorkQueue, raw: bytes, gen: int) -> None:
        self._dma_gate(gen)
        desc = DESC.unpack(raw)
        outcome, flags, opcode = self._process(wq, desc, gen, in_batch=False)
        if outcome is not None:
            self._complete(wq, desc, outcome, gen)
        now = time.time()
        self.completion_times.append(now)
        self.completion_bytes.append((now, self.stats.bytes))

    def _process(self, wq: WorkQueue, desc: tuple, gen: int, in_batch: bool):
        """Validate and run one descriptor; returns (Outcome or None, flags, opcode).

        None means the error went to SWERR (there is no record to write).
        """
        _, fo, comp_addr, src, dst, size, int_handle, _, op = desc
        flags, opcode = fo & 0xFFFFFF, fo >> 24
        bad = flags & ~VALID_FLAGS
        if flags & IDXD_OP_FLAG_BOF and not GENCAP_VALUE & GENCAP_BLOCK_ON_FAULT:
            bad |= IDXD_OP_FLAG_BOF
        if flags & IDXD_OP_FLAG_RCR and not flags & IDXD_OP_FLAG_CRAV:
            bad |= IDXD_OP_FLAG_RCR
        if flags & IDXD_OP_FLAG_CRAV and comp_addr % 32:
            self._swerr(DSA_COMP_CRA_ALIGN, wq=wq, opcode=opcode, batch=in_batch, fault_addr=comp_addr)
            self._count(DSA_COMP_CRA_ALIGN)
            return None, flags, opcode
        if bad:
            return Outcome(DSA_COMP_INVALID_FLAGS, extra=struct.pack("<I", bad & 0xFFFFFF)), flags, opcode
        if flags & IDXD_OP_FLAG_RCI and int_handle >= self.msix.nvec:
            return Outcome(DSA_COMP_INT_HANDLE_INVAL), flags, opcode
        if not (OPCAP_SUPPORTED >> opcode) & 1 or (in_batch and opcode == DSA_OPCODE_BATCH):
            return Outcome(DSA_COMP_BAD_OPCODE), flags, opcode
        domain = self.domain
        if opcode in (DSA_OPCODE_NOOP, DSA_OPCODE_DRAIN):
            return Outcome(), flags, opcode
        if opcode == DSA_OPCODE_BATCH:
            return self._batch(wq, src, size, gen), flags, opcode
        if size == 0 or size > wq.max_xfer:
            return Outcome(DSA_COMP_XFER_ERANGE), flags, opcode
        if domain is None:  # no translation at all: every access faults
            return Outcome(DSA_COMP_PAGE_FAULT_NOBOF, fault_addr=src), flags, opcode
        if opcode == DSA_OPCODE_MEMMOVE:
            return self._copy(domain, src, (dst,), size, gen), flags, opcode
        if opcode == DSA_OPCODE_DUALCAST:
            dst2 = OP_U64.unpack_from(op)[0]
            if (dst ^ dst2) & 0xFFF:
                return Outcome(DSA_COMP_DCAST_ERR), flags, opcode
            if _overlap(src, dst, size) or _overlap(src, dst2, size) or _overlap(dst, dst2, size):
                return Outcome(DSA_COMP_OVERLAP_BUFFERS), flags, opcode
            return self._copy(domain, src, (dst, dst2), size, gen), flags, opcode
        if opcode == DSA_OPCODE_MEMFILL:
            return self._fill(domain, _u64.pack(src), dst, size, gen), flags, opcode
        if opcode in (DSA_OPCODE_CR_DELTA, DSA_OPCODE_AP_DELTA):
            if (src | dst | size) % 8:
                return Outcome(DSA_COMP_ADDR_ALIGN), flags, opcode
            if size > DELTA_MAX_XFER:
                return Outcome(DSA_COMP_XFER_ERANGE), flags, opcode
            if opcode == DSA_OPCODE_AP_DELTA:
                return self._apply_delta(domain, src, dst, size, OP_U32.unpack_from(op)[0]), flags, opcode
            delta_addr, max_delta = OP_DELTA.unpack_from(op)[:2]
            if delta_addr % 8:
                return Outcome(DSA_COMP_ADDR_ALIGN), flags, opcode
            if max_delta % DELTA_ENTRY.size or max_delta == 0:
                return Outcome(DSA_COMP_DR_ERANGE), flags, opcode
            outcome = self._create_delta(domain, src, dst, size, delta_addr, max_delta)
        elif opcode == DSA_OPCODE_COMPARE:
            outcome = self._compare(domain, src, dst, None, size, gen)
        elif opcode == DSA_OPCODE_COMPVAL:
            outcome = self._compare(domain, src, None, _u64.pack(dst), size, gen)
        elif opcode == DSA_OPCODE_CRCGEN:
            return self._crc(domain, src, None, size, OP_CRC.unpack_from(op)[0], gen), flags, opcode
        else:  # COPY_CRC
            if _overlap(src, dst, size):
                return Outcome(DSA_COMP_OVERLAP_BUFFERS), flags, opcode
            return self._crc(domain, src, dst, size, OP_CRC.unpack_from(op)[0], gen), flags, opcode
        if flags & IDXD_OP_FLAG_CR and outcome.status == DSA_COMP_SUCCESS and outcome.result != (op[0] & 1):
            outcome.status = DSA_COMP_SUCCESS_PRED
        return outcome, flags, opcode

    def _count(self, status: int) -> None:
        # Only the engine thread writes the statistics.
        stats = self.stats
        stats.by_status[status] += 1
        stats.descriptors += 1
        if status != DSA_COMP_SUCCESS and status != DSA_COMP_SUCCESS_PRED:
            stats.errors += 1
            if status & DSA_COMP_STATUS_MASK == DSA_COMP_PAGE_FAULT_NOBOF:
                stats.faults += 1

    def _complete(self, wq: WorkQueue, desc: tuple, outcome: Outcome, gen: int) -> None:
        """Write the completion record and raise the interrupt, as the flags ask."""
        _, fo, comp_addr, _, _, _, int_handle, _, _ = desc
        flags, opcode = fo & 0xFFFFFF, fo >> 24
        if gen != self._abort_gen:
            raise _Aborted
        status = outcome.status
        self._count(status)
        ok = status in (DSA_COMP_SUCCESS, DSA_COMP_SUCCESS_PRED)
        if flags & IDXD_OP_FLAG_CRAV and (flags & IDXD_OP_FLAG_RCR or not ok):
            record = COMP.pack(status, outcome.result, 0, 0, outcome.completed & 0xFFFFFFFF,
                               outcome.fault_addr, outcome.extra.ljust(16, b"\0")[:16])
            domain = self.domain
            segments, fault = domain.translate(comp_addr, 32, True) if domain else ([], comp_addr)
            if fault is not None:
                self._swerr(DSA_COMP_CRA_XLAT, wq=wq, opcode=opcode, fault_addr=fault, write=True)
            else:
                mem, off, _ = segments[0]  # 32-byte aligned: never crosses a page
                mem.view[off + 1:off + 32] = record[1:]
                mem.view[off] = record[0]  # status last: a poller sees a whole record
        elif not ok and not flags & IDXD_OP_FLAG_CRAV:
            self._swerr(status & 0x7F, wq=wq, opcode=opcode, fault_addr=outcome.fault_addr,
                        write=bool(status & DSA_COMP_STATUS_WRITE))
        if flags & IDXD_OP_FLAG_RCI and int_handle < self.msix.nvec:
            self.msix.raise_vector(int_handle)

    # --- operations ---------------------------------------------------------------------------

    def _batch(self, wq: WorkQueue, list_addr: int, count: int, gen: int) -> Outcome:
        if count < 2 or count > wq.max_batch:
            return Outcome(DSA_COMP_DESC_CNT_ERANGE)
        if list_addr % DSA_DESC_SIZE:
            return Outcome(DSA_COMP_DESCLIST_ALIGN)
        domain = self.domain
        if domain is None:
            return Outcome(DSA_COMP_BATCH_PAGE_FAULT, fault_addr=list_addr)
        segments, fault = domain.translate(list_addr, count * DSA_DESC_SIZE, False)
        raw = b"".join(bytes(m.view[o:o + n]) for m, o, n in segments)
        readable = len(raw) // DSA_DESC_SIZE
        self.stats.batches += 1
        failed = False
        done = 0
        unpack, translate, stats = DESC.unpack_from, domain.translate, self.stats
        fast_limit = min(CHUNK, wq.max_xfer)
        for i in range(readable):
            desc = unpack(raw, i * DSA_DESC_SIZE)
            fo = desc[1]
            if fo & IDXD_OP_FLAG_FENCE and failed:
                return Outcome(DSA_COMP_BATCH_FAIL, completed=done)
            if gen != self._abort_gen or not self._bme:
                self._dma_gate(gen)
            # Fast path for the bulk of real batches: a MEMMOVE that only wants
            # a record on error, between two contiguous mapped buffers.
            if fo & _FAST_MASK == _FAST_MEMMOVE and 0 < desc[5] <= fast_limit and not desc[2] & 31:
                if self._move_contiguous(translate, desc[3], desc[4], desc[5], gen):
                    stats.descriptors += 1
                    stats.by_status[DSA_COMP_SUCCESS] += 1
                    done += 1
                    continue
            outcome, flags, opcode = self._process(wq, desc, gen, in_batch=True)
            if outcome is None:
                failed = True
            else:
                self._complete(wq, desc, outcome, gen)
                failed |= outcome.status != DSA_COMP_SUCCESS
            done += 1
        if fault is not None and readable < count:
            return Outcome(DSA_COMP_BATCH_PAGE_FAULT, completed=done,
                           fault_addr=list_addr + readable * DSA_DESC_SIZE)
        return Outcome(DSA_COMP_BATCH_FAIL if failed else DSA_COMP_SUCCESS, completed=done)

    def _pieces(self, domain: IommuDomain, src: int, dsts: tuple[int, ...], size: int):
        """Translate a source and destinations together: returns ([(src_addr,
        [dst_addr...], n)], usable_bytes, fault_addr, fault_is_write)."""
        src_segs, src_fault = domain.translate(src, size, False)
        usable = sum(n for _, _, n in src_segs)
        fault, write = (src + usable, False) if src_fault is not None else (None, False)
        dst_segs_all = []
        for d in dsts:
            segs, dfault = domain.translate(d, size, True)
            got = sum(n for _, _, n in segs)
            if got < usable:  # the source is read before the destination is written
                usable, fault, write = got, d + got, True
            dst_segs_all.append(segs)
        # Walk all segment lists together, cutting at every boundary.
        pieces = []
        cursors = [list(s) for s in [src_segs] + dst_segs_all]
        done = 0
        while done < usable:
            n = min(usable - done, CHUNK, *(c[0][2] for c in cursors))
            addrs = [c[0][0].address + c[0][1] for c in cursors]
            pieces.append((addrs[0], addrs[1:], n))
            for c in cursors:
                mem, off, left = c[0]
                c[0] = (mem, off + n, left - n)
                if left == n:
                    c.pop(0)
            done += n
        return pieces, usable, fault, write

    def _move_contiguous(self, translate, src: int, dst: int, size: int, gen: int) -> bool:
        """The common case of a move, kept short: one chunk between one
        contiguous source and one contiguous destination.  False: take the
        general path (several segments, a fault)."""
        (s_segs, s_fault), (d_segs, d_fault) = translate(src, size, False), translate(dst, size, True)
        if s_fault is not None or d_fault is not None or len(s_segs) != 1 or len(d_segs) != 1:
            return False
        smem, soff, _ = s_segs[0]
        dmem, doff, _ = d_segs[0]
        _memmove(dmem.address + doff, smem.address + soff, size)
        self.stats.bytes += size
        if self.bandwidth:
            self._pace(size, gen)
        return True

    def _copy(self, domain: IommuDomain, src: int, dsts: tuple[int, ...], size: int, gen: int) -> Outcome:
        if len(dsts) == 1 and size <= CHUNK and self._move_contiguous(domain.translate, src, dsts[0], size, gen):
            return Outcome()
        pieces, usable, fault, write = self._pieces(domain, src, dsts, size)
        # Overlapping move to a higher address: copy the pieces last to first.
        backwards = any(s < d < s + size for s, ds, _ in pieces[:1] for d in ds)
        for s, ds, n in (reversed(pieces) if backwards else pieces):
            self._dma_gate(gen)
            for d in ds:
                _memmove(d, s, n)
            self.stats.bytes += n
            self._pace(n, gen)
        return _partial(usable, size, fault, write)

    def _fill(self, domain: IommuDomain, pattern: bytes, dst: int, size: int, gen: int) -> Outcome:
        segs, fault = domain.translate(dst, size, True)
        done = 0
        block = pattern * (min(size, CHUNK) // 8 + 2)
        for mem, off, n in segs:
            pos = 0
            while pos < n:
                self._dma_gate(gen)
                k = min(n - pos, CHUNK)
                phase = (done + pos) % 8
                _memmove(mem.address + off + pos, block[phase:phase + k], k)
                self.stats.bytes += k
                self._pace(k, gen)
                pos += k
            done += n
        return _partial(done, size, fault, True)

    def _compare(self, domain, src: int, src2: int | None, pattern: bytes | None, size: int, gen: int) -> Outcome:
        segs1, fault1 = domain.translate(src, size, False)
        usable = sum(n for _, _, n in segs1)
        fault = src + usable if fault1 is not None else None
        if src2 is not None:
            segs2, fault2 = domain.translate(src2, size, False)
            got = sum(n for _, _, n in segs2)
            if got < usable:
                usable, fault = got, src2 + got
        done = 0
        while done < usable:
            self._dma_gate(gen)
            k = min(usable - done, CHUNK)
            a = domain.read(src + done, k)
            if pattern is not None:
                phase = done % 8
                b = (pattern * (k // 8 + 2))[phase:phase + k]
            else:
                b = domain.read(src2 + done, k)
            if a != b:
                first = next(i for i in range(k) if a[i] != b[i])
                self.stats.bytes += first
                return Outcome(DSA_COMP_SUCCESS, result=1, completed=done + first)
            self.stats.bytes += k
            self._pace(k, gen)
            done += k
        if fault is not None:
            return Outcome(DSA_COMP_PAGE_FAULT_NOBOF, completed=done, fault_addr=fault)
        return Outcome(DSA_COMP_SUCCESS, result=0)

    def _create_delta(self, domain, src1: int, src2: int, size: int, delta_addr: int, max_delta: int) -> Outcome:
        """CR_DELTA: a delta record of the 8-byte words where src2 differs from
        src1, each entry (u16 word offset, u64 src2 word).  Result 0: equal;
        1: the record describes the difference; 2: it did not fit."""
        try:
            a, b = domain.read(src1, size), domain.read(src2, size)
        except DmaFault as fault:
            return Outcome(DSA_COMP_PAGE_FAULT_NOBOF, fault_addr=fault.addr)
        self.stats.bytes += size
        record = bytearray()
        result = 0
        for i, (x, y) in enumerate(zip(_words(a), _words(b))):
            if x != y:
                if len(record) + DELTA_ENTRY.size > max_delta:
                    result = 2
                    break
                record += DELTA_ENTRY.pack(i, y)
                result = 1
        if record:
            try:
                domain.write(delta_addr, bytes(record))
            except DmaFault as fault:
                return Outcome(DSA_COMP_PAGE_FAULT_NOBOF | DSA_COMP_STATUS_WRITE, fault_addr=fault.addr)
        return Outcome(DSA_COMP_SUCCESS, result=result, extra=struct.pack("<I", len(record)))

    def _apply_delta(self, domain, record_addr: int, dst: int, size: int, record_size: int) -> Outcome:
        """AP_DELTA: write a CR_DELTA record's words into ``dst``."""
        if record_size % DELTA_ENTRY.size or record_size > size // 8 * DELTA_ENTRY.size:
            return Outcome(DSA_COMP_DR_ERANGE)
        try:
            record = domain.read(record_addr, record_size)
        except DmaFault as fault:
            return Outcome(DSA_COMP_PAGE_FAULT_NOBOF, fault_addr=fault.addr)
        entries = list(DELTA_ENTRY.iter_unpack(record))
        last = -1
        for offset, _ in entries:  # the whole record is checked before anything is written
            if offset <= last:
                return Outcome(DSA_COMP_DR_OFFSET_NOINC)
            if offset * 8 + 8 > size:
                return Outcome(DSA_COMP_DR_OFFSET_ERANGE)
            last = offset
        for offset, word in entries:
            try:
                domain.write(dst + offset * 8, _u64.pack(word))
            except DmaFault as fault:
                return Outcome(DSA_COMP_PAGE_FAULT_NOBOF | DSA_COMP_STATUS_WRITE, fault_addr=fault.addr)
        self.stats.bytes += size
        return Outcome()

    def _crc(self, domain, src: int, dst: int | None, size: int, seed: int, gen: int) -> Outcome:
        if dst is not None:
            pieces, usable, fault, write = self._pieces(domain, src, (dst,), size)
        else:
            segs, sfault = domain.translate(src, size, False)
            usable = sum(n for _, _, n in segs)
            fault, write = (src + usable if sfault is not None else None), False
            pieces = [(mem.address + off + k, [], min(CHUNK, n - k))
                      for mem, off, n in segs for k in range(0, n, CHUNK)]
        crc = seed
        for s, ds, n in pieces:
            self._dma_gate(gen)
            data = ctypes.string_at(s, n)
            crc = crc32c.crc32c(data, value=crc)
            for d in ds:
                _memmove(d, s, n)
            self.stats.bytes += n
            self._pace(n, gen)
        outcome = _partial(usable, size, fault, write)
        outcome.extra = _u64.pack(crc)
        return outcome


def _words(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 8}Q", data))


def _overlap(a: int, b: int, size: int) -> bool:
    return a < b + size and b < a + size


def _partial(done: int, size: int, fault: int | None, write: bool) -> Outcome:
    if done == size or fault is None:
        return Outcome(DSA_COMP_SUCCESS, completed=0)
    status = DSA_COMP_PAGE_FAULT_NOBOF | (DSA_COMP_STATUS_WRITE if write else 0)
    return Outcome(status, completed=done, fault_addr=fault)
