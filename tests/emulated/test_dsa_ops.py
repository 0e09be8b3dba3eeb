"""Every DSA opcode, flag and completion status the model implements."""

import os
import struct

import crc32c
import pytest

from luvmm.devices.dsa_regs import (
    IDXD_SWERR_OFFSET,
    IDXD_SWERR_VALID,
    SWERR_ERROR_SHIFT,
)
from luvmm.uapi.idxd import (
    DSA_COMP_ADDR_ALIGN,
    DSA_COMP_BAD_OPCODE,
    DSA_COMP_DR_OFFSET_NOINC,
    DSA_COMP_BATCH_FAIL,
    DSA_COMP_BATCH_PAGE_FAULT,
    DSA_COMP_CRA_ALIGN,
    DSA_COMP_CRA_XLAT,
    DSA_COMP_DCAST_ERR,
    DSA_COMP_DESC_CNT_ERANGE,
    DSA_COMP_DESCLIST_ALIGN,
    DSA_COMP_INT_HANDLE_INVAL,
    DSA_COMP_INVALID_FLAGS,
    DSA_COMP_NONE,
    DSA_COMP_OVERLAP_BUFFERS,
    DSA_COMP_PAGE_FAULT_NOBOF,
    DSA_COMP_STATUS_WRITE,
    DSA_COMP_SUCCESS,
    DSA_COMP_SUCCESS_PRED,
    DSA_COMP_XFER_ERANGE,
    DSA_OPCODE_BATCH,
    DSA_OPCODE_CFLUSH,
    DSA_OPCODE_COMPARE,
    DSA_OPCODE_COMPVAL,
    DSA_OPCODE_COPY_CRC,
    DSA_OPCODE_CR_DELTA,
    DSA_OPCODE_CRCGEN,
    DSA_OPCODE_DIF_CHECK,
    DSA_OPCODE_DRAIN,
    DSA_OPCODE_DUALCAST,
    DSA_OPCODE_MEMFILL,
    DSA_OPCODE_MEMMOVE,
    DSA_OPCODE_NOOP,
    DSA_OPCODE_TRANSL_FETCH,
    DSA_OPCODE_AP_DELTA,
    IDXD_OP_FLAG_BOF,
    IDXD_OP_FLAG_CR,
    IDXD_OP_FLAG_CRAV,
    IDXD_OP_FLAG_FENCE,
    IDXD_OP_FLAG_RCI,
    IDXD_OP_FLAG_RCR,
    pack_desc,
)
from luvmm.devices.emu.iommu import IOMMU_READ
from tests.support.dsa_rig import DATA, REC, submit

CRAV_RCR = IDXD_OP_FLAG_CRAV | IDXD_OP_FLAG_RCR
A, B, C = DATA, DATA + 0x100000, DATA + 0x200000


def fill(rig, offset, data):
    rig.view[offset:offset + len(data)] = data


def swerr_error(rig):
    word = rig.driver.readq(IDXD_SWERR_OFFSET)
    return (word >> SWERR_ERROR_SHIFT) & 0xFF if word & IDXD_SWERR_VALID else None


def test_noop_and_drain(rig):
    for opcode in (DSA_OPCODE_NOOP, DSA_OPCODE_DRAIN):
        assert submit(rig, opcode=opcode, flags=CRAV_RCR)["status"] == DSA_COMP_SUCCESS


@pytest.mark.parametrize("delta", [0, 100, -100])
def test_memmove_including_overlap(rig, delta):
    data = os.urandom(0x3000)
    fill(rig, A, data)
    record = submit(rig, opcode=DSA_OPCODE_MEMMOVE, flags=CRAV_RCR, src=rig.iova(A), dst=rig.iova(A + delta),
                    xfer_size=len(data))
    assert record["status"] == DSA_COMP_SUCCESS
    assert rig.view[A + delta:A + delta + len(data)] == data  # memmove semantics when buffers overlap


def test_memfill_repeats_the_pattern(rig):
    pattern = struct.pack("<Q", 0x0102030405060708)
    record = submit(rig, opcode=DSA_OPCODE_MEMFILL, flags=CRAV_RCR, src=struct.unpack("<Q", pattern)[0],
                    dst=rig.iova(A), xfer_size=1001)
    assert record["status"] == DSA_COMP_SUCCESS
    assert rig.view[A:A + 1001] == (pattern * 126)[:1001]


def test_compare_and_compval(rig):
    data = os.urandom(8192)
    fill(rig, A, data)
    fill(rig, B, data)
    equal = submit(rig, opcode=DSA_OPCODE_COMPARE, flags=CRAV_RCR, src=rig.iova(A), dst=rig.iova(B), xfer_size=8192)
    assert (equal["status"], equal["result"]) == (DSA_COMP_SUCCESS, 0)
    rig.view[B + 5000] ^= 0xFF
    diff = submit(rig, opcode=DSA_OPCODE_COMPARE, flags=CRAV_RCR, src=rig.iova(A), dst=rig.iova(B), xfer_size=8192)
    assert (diff["status"], diff["result"], diff["bytes_completed"]) == (DSA_COMP_SUCCESS, 1, 5000)
    fill(rig, C, b"\xAB" * 4096)
    val = submit(rig, opcode=DSA_OPCODE_COMPVAL, flags=CRAV_RCR, src=rig.iova(C), dst=0xABABABABABABABAB,
                 xfer_size=4096)
    assert (val["status"], val["result"]) == (DSA_COMP_SUCCESS, 0)
    rig.view[C + 4095] = 0
    val = submit(rig, opcode=DSA_OPCODE_COMPVAL, flags=CRAV_RCR, src=rig.iova(C), dst=0xABABABABABABABAB,
                 xfer_size=4096)
    assert (val["result"], val["bytes_completed"]) == (1, 4095)


def test_check_result_flag_gives_success_pred(rig):
    fill(rig, A, b"x" * 64)
    fill(rig, B, b"y" * 64)
    args = dict(opcode=DSA_OPCODE_COMPARE, src=rig.iova(A), dst=rig.iova(B), xfer_size=64)
    # expected_res (byte 40) = 0 ("equal") but they differ: false predicate.
    assert submit(rig, flags=CRAV_RCR | IDXD_OP_FLAG_CR, **args)["status"] == DSA_COMP_SUCCESS_PRED
    assert submit(rig, flags=CRAV_RCR | IDXD_OP_FLAG_CR, op_specific=b"\x01", **args)["status"] == DSA_COMP_SUCCESS
    assert submit(rig, flags=CRAV_RCR, **args)["status"] == DSA_COMP_SUCCESS  # without CR: no predicate


def test_dualcast(rig):
    data = os.urandom(2048)
    fill(rig, A, data)
    dst1, dst2 = B + 0x10, C + 0x10  # equal in bits 11:0
    record = submit(rig, opcode=DSA_OPCODE_DUALCAST, flags=CRAV_RCR, src=rig.iova(A), dst=rig.iova(dst1),
                    xfer_size=2048, op_specific=struct.pack("<Q", rig.iova(dst2)))
    assert record["status"] == DSA_COMP_SUCCESS
    assert rig.view[dst1:dst1 + 2048] == data and rig.view[dst2:dst2 + 2048] == data
    bad = submit(rig, opcode=DSA_OPCODE_DUALCAST, flags=CRAV_RCR, src=rig.iova(A), dst=rig.iova(B),
                 xfer_size=64, op_specific=struct.pack("<Q", rig.iova(C + 8)))
    assert bad["status"] == DSA_COMP_DCAST_ERR
    overlap = submit(rig, opcode=DSA_OPCODE_DUALCAST, flags=CRAV_RCR, src=rig.iova(A), dst=rig.iova(B),
                     xfer_size=0x2000, op_specific=struct.pack("<Q", rig.iova(B + 0x1000)))
    assert overlap["status"] == DSA_COMP_OVERLAP_BUFFERS


def test_crcgen_and_copy_crc(rig):
    data = os.urandom(10000)
    fill(rig, A, data)
    record = submit(rig, opcode=DSA_OPCODE_CRCGEN, flags=CRAV_RCR, src=rig.iova(A), xfer_size=len(data))
    crc = struct.unpack_from("<Q", record["op_specific"])[0]
    assert record["status"] == DSA_COMP_SUCCESS and crc == crc32c.crc32c(data)
    # Continue from a seed: the CRC of two halves equals the CRC of the whole.
    first = submit(rig, opcode=DSA_OPCODE_CRCGEN, flags=CRAV_RCR, src=rig.iova(A), xfer_size=4000)
    seed = struct.unpack_from("<Q", first["op_specific"])[0]
    second = submit(rig, opcode=DSA_OPCODE_CRCGEN, flags=CRAV_RCR, src=rig.iova(A + 4000), xfer_size=6000,
                    op_specific=struct.pack("<IIQ", seed, 0, 0))
    assert struct.unpack_from("<Q", second["op_specific"])[0] == crc
    copy = submit(rig, opcode=DSA_OPCODE_COPY_CRC, flags=CRAV_RCR, src=rig.iova(A), dst=rig.iova(B),
                  xfer_size=len(data))
    assert copy["status"] == DSA_COMP_SUCCESS and struct.unpack_from("<Q", copy["op_specific"])[0] == crc
    assert rig.view[B:B + len(data)] == data
    overlap = submit(rig, opcode=DSA_OPCODE_COPY_CRC, flags=CRAV_RCR, src=rig.iova(A), dst=rig.iova(A + 16),
                     xfer_size=64)
    assert overlap["status"] == DSA_COMP_OVERLAP_BUFFERS


@pytest.mark.parametrize("opcode", [DSA_OPCODE_TRANSL_FETCH, DSA_OPCODE_DIF_CHECK, DSA_OPCODE_CFLUSH, 0x7F, 0xFF])
def test_unimplemented_opcodes_are_bad_opcode(rig, opcode):
    assert submit(rig, opcode=opcode, flags=CRAV_RCR, xfer_size=64)["status"] == DSA_COMP_BAD_OPCODE


def test_delta_records_and_address_alignment(rig):
    old = os.urandom(4096)
    new = bytearray(old)
    for word in (3, 100, 511):
        new[8 * word:8 * word + 8] = os.urandom(8)
    fill(rig, A, old)
    fill(rig, B, bytes(new))
    record = submit(rig, opcode=DSA_OPCODE_CR_DELTA, flags=CRAV_RCR, src=rig.iova(A), dst=rig.iova(B),
                    xfer_size=4096, op_specific=struct.pack("<QI", rig.iova(C), 80))
    assert (record["status"], record["result"]) == (DSA_COMP_SUCCESS, 1)
    size = struct.unpack_from("<I", record["op_specific"])[0]
    assert size == 30 and struct.unpack_from("<HQ", rig.view[C:C + 10])[0] == 3
    # Apply the delta to the old copy: it becomes the new one.
    record = submit(rig, opcode=DSA_OPCODE_AP_DELTA, flags=CRAV_RCR, src=rig.iova(C), dst=rig.iova(A),
                    xfer_size=4096, op_specific=struct.pack("<I", size))
    assert record["status"] == DSA_COMP_SUCCESS and rig.view[A:A + 4096] == bytes(new)
    # Too small a record: result 2.
    fill(rig, A, old)
    record = submit(rig, opcode=DSA_OPCODE_CR_DELTA, flags=CRAV_RCR, src=rig.iova(A), dst=rig.iova(B),
                    xfer_size=4096, op_specific=struct.pack("<QI", rig.iova(C), 20))
    assert record["result"] == 2
    # Word operations need 8-byte alignment.
    for src, dst, size in ((A + 4, B, 64), (A, B + 2, 64), (A, B, 60)):
        record = submit(rig, opcode=DSA_OPCODE_CR_DELTA, flags=CRAV_RCR, src=rig.iova(src), dst=rig.iova(dst),
                        xfer_size=size, op_specific=struct.pack("<QI", rig.iova(C), 80))
        assert record["status"] == DSA_COMP_ADDR_ALIGN
    # A record whose offsets do not increase is refused before anything is written.
    fill(rig, C, struct.pack("<HQHQ", 5, 1, 5, 2))
    record = submit(rig, opcode=DSA_OPCODE_AP_DELTA, flags=CRAV_RCR, src=rig.iova(C), dst=rig.iova(A),
                    xfer_size=4096, op_specific=struct.pack("<I", 20))
    assert record["status"] == DSA_COMP_DR_OFFSET_NOINC and rig.view[A:A + 4096] == old


def test_invalid_flags(rig):
    record = submit(rig, opcode=DSA_OPCODE_NOOP, flags=CRAV_RCR | 1 << 16)
    assert record["status"] == DSA_COMP_INVALID_FLAGS
    assert struct.unpack_from("<I", record["op_specific"])[0] & 0xFFFFFF == 1 << 16
    # No block-on-fault: the device has no page-request interface.
    assert submit(rig, opcode=DSA_OPCODE_NOOP, flags=CRAV_RCR | IDXD_OP_FLAG_BOF)["status"] == DSA_COMP_INVALID_FLAGS
    # RCR without CRAV: there is no record to write, so it is a software error.
    record = submit(rig, opcode=DSA_OPCODE_NOOP, flags=IDXD_OP_FLAG_RCR)
    assert record["status"] == DSA_COMP_NONE
    assert swerr_error(rig) == DSA_COMP_INVALID_FLAGS


def test_xfer_erange(rig):
    args = dict(opcode=DSA_OPCODE_MEMMOVE, flags=CRAV_RCR, src=rig.iova(A), dst=rig.iova(B))
    assert submit(rig, xfer_size=0, **args)["status"] == DSA_COMP_XFER_ERANGE
    rig.dev.wqs[0].max_xfer = 4096  # as a WQ configured with max_xfer_shift 12
    assert submit(rig, xfer_size=4097, **args)["status"] == DSA_COMP_XFER_ERANGE
    assert submit(rig, xfer_size=4096, **args)["status"] == DSA_COMP_SUCCESS


def test_completion_record_alignment_and_translation_are_software_errors(rig):
    rig.view[REC:REC + 64] = bytes(64)
    submit(rig, opcode=DSA_OPCODE_NOOP, flags=CRAV_RCR, completion_addr=rig.iova(REC + 8))
    assert rig.view[REC:REC + 64] == bytes(64)
    assert swerr_error(rig) == DSA_COMP_CRA_ALIGN
    rig.driver.writeq(IDXD_SWERR_OFFSET, IDXD_SWERR_VALID)  # acknowledge
    assert swerr_error(rig) is None
    submit(rig, opcode=DSA_OPCODE_NOOP, flags=CRAV_RCR, completion_addr=0x9_0000_0000)
    assert swerr_error(rig) == DSA_COMP_CRA_XLAT
    assert rig.driver.readq(IDXD_SWERR_OFFSET + 16) == 0x9_0000_0000


def test_int_handle_inval(rig):
    record = submit(rig, opcode=DSA_OPCODE_NOOP, flags=CRAV_RCR | IDXD_OP_FLAG_RCI, int_handle=9)
    assert record["status"] == DSA_COMP_INT_HANDLE_INVAL
    assert all(rig.eventfd_count(v) == 0 for v in range(9))


def test_rci_raises_the_named_vector(rig):
    for vector in (1, 3, 8):
        rig.driver.msix_enable(vector)
        submit(rig, opcode=DSA_OPCODE_NOOP, flags=CRAV_RCR | IDXD_OP_FLAG_RCI, int_handle=vector)
        assert rig.eventfd_count(vector) == 1


def test_crav_without_rcr_writes_a_record_only_on_error(rig):
    fill(rig, REC, b"\xEE" * 32)
    submit(rig, completion=REC, opcode=DSA_OPCODE_NOOP, flags=IDXD_OP_FLAG_CRAV, completion_addr=rig.iova(REC))
    assert rig.view[REC] == 0xEE  # success: untouched
    record = submit(rig, completion=REC, opcode=0x7F, flags=IDXD_OP_FLAG_CRAV, completion_addr=rig.iova(REC))
    assert record["status"] == DSA_COMP_BAD_OPCODE


def test_page_faults_report_progress_and_software_resumes(rig):
    """Read fault: bytes_completed and fault_addr; write fault: the 0x80 bit.
    Recovery as software does it: resubmit the rest."""
    data = os.urandom(3 * 4096)
    gap = 0x2_0000_0000  # an IOVA window: 2 pages mapped (memory at C), then a hole
    rig.domain.map(gap, rig.mem, C, 2 * 4096)
    fill(rig, C, data[:8192])
    record = submit(rig, opcode=DSA_OPCODE_MEMMOVE, flags=CRAV_RCR, src=gap, dst=rig.iova(B), xfer_size=len(data))
    assert record["status"] == DSA_COMP_PAGE_FAULT_NOBOF
    assert (record["bytes_completed"], record["fault_addr"]) == (8192, gap + 8192)
    assert rig.view[B:B + 8192] == data[:8192]
    fill(rig, A, data)
    record = submit(rig, opcode=DSA_OPCODE_MEMMOVE, flags=CRAV_RCR, src=rig.iova(A), dst=gap + 4096, xfer_size=8192)
    assert record["status"] == DSA_COMP_PAGE_FAULT_NOBOF | DSA_COMP_STATUS_WRITE
    assert (record["bytes_completed"], record["fault_addr"]) == (4096, gap + 8192)
    assert rig.view[C + 4096:C + 8192] == data[:4096]
    # The OS maps the missing page; the driver resubmits what was left.
    hole = B + 0x8000
    rig.domain.map(gap + 8192, rig.mem, hole, 4096)
    done = record["bytes_completed"]
    record = submit(rig, opcode=DSA_OPCODE_MEMMOVE, flags=CRAV_RCR, src=rig.iova(A + done),
                    dst=gap + 4096 + done, xfer_size=8192 - done)
    assert record["status"] == DSA_COMP_SUCCESS
    assert rig.view[hole:hole + 4096] == data[4096:8192]


def test_read_only_mapping_faults_on_write(rig):
    ro = 0x3_0000_0000
    rig.domain.map(ro, rig.mem, C, 4096, IOMMU_READ)
    record = submit(rig, opcode=DSA_OPCODE_MEMMOVE, flags=CRAV_RCR, src=rig.iova(A), dst=ro, xfer_size=64)
    assert record["status"] == DSA_COMP_PAGE_FAULT_NOBOF | DSA_COMP_STATUS_WRITE
    assert submit(rig, opcode=DSA_OPCODE_MEMMOVE, flags=CRAV_RCR, src=ro, dst=rig.iova(A),
                  xfer_size=64)["status"] == DSA_COMP_SUCCESS


# --- batches -------------------------------------------------------------------------------------

LIST = DATA + 0x300000
RECS = DATA + 0x310000


def write_batch(rig, descs):
    for i, d in enumerate(descs):
        rig.view[LIST + 64 * i:LIST + 64 * (i + 1)] = d


def member(rig, i, opcode=DSA_OPCODE_MEMMOVE, flags=IDXD_OP_FLAG_CRAV, **kw):
    kw.setdefault("src", rig.iova(A))
    kw.setdefault("dst", rig.iova(B + 64 * i))
    kw.setdefault("xfer_size", 64)
    rig.view[RECS + 32 * i:RECS + 32 * (i + 1)] = bytes(32)
    return pack_desc(opcode=opcode, flags=flags, completion_addr=rig.iova(RECS + 32 * i), **kw)


def batch(rig, count, list_addr=None, flags=CRAV_RCR):
    return submit(rig, opcode=DSA_OPCODE_BATCH, flags=flags,
                  src=rig.iova(LIST) if list_addr is None else list_addr, xfer_size=count)


def member_status(rig, i):
    return rig.view[RECS + 32 * i]


def test_batch_success_and_failure(rig):
    fill(rig, A, os.urandom(64))
    write_batch(rig, [member(rig, i) for i in range(8)])
    record = batch(rig, 8)
    assert (record["status"], record["bytes_completed"]) == (DSA_COMP_SUCCESS, 8)
    assert all(rig.view[B + 64 * i:B + 64 * (i + 1)] == rig.view[A:A + 64] for i in range(8))
    descs = [member(rig, i) for i in range(8)]
    descs[3] = member(rig, 3, opcode=0x7F)
    write_batch(rig, descs)
    record = batch(rig, 8)
    assert (record["status"], record["bytes_completed"]) == (DSA_COMP_BATCH_FAIL, 8)
    assert member_status(rig, 3) == DSA_COMP_BAD_OPCODE  # CRAV: a record on error only
    assert member_status(rig, 4) == DSA_COMP_NONE


def test_fence_after_a_failure_abandons_the_rest(rig):
    descs = [member(rig, i) for i in range(6)]
    descs[1] = member(rig, 1, xfer_size=0)  # XFER_ERANGE
    descs[4] = member(rig, 4, flags=IDXD_OP_FLAG_CRAV | IDXD_OP_FLAG_RCR | IDXD_OP_FLAG_FENCE)
    write_batch(rig, descs)
    record = batch(rig, 6)
    assert (record["status"], record["bytes_completed"]) == (DSA_COMP_BATCH_FAIL, 4)
    assert member_status(rig, 4) == DSA_COMP_NONE  # abandoned: never ran
    # A false predicate is a failure for the fence too.
    fill(rig, C, b"a" * 64)
    fill(rig, C + 64, b"b" * 64)
    descs = [member(rig, 0, opcode=DSA_OPCODE_COMPARE, flags=IDXD_OP_FLAG_CRAV | IDXD_OP_FLAG_CR,
                    src=rig.iova(C), dst=rig.iova(C + 64)),
             member(rig, 1, flags=CRAV_RCR | IDXD_OP_FLAG_FENCE)]
    write_batch(rig, descs)
    assert batch(rig, 2)["status"] == DSA_COMP_BATCH_FAIL
    assert member_status(rig, 1) == DSA_COMP_NONE


def test_batch_errors(rig):
    write_batch(rig, [member(rig, i) for i in range(4)])
    assert batch(rig, 1)["status"] == DSA_COMP_DESC_CNT_ERANGE
    assert batch(rig, 1025)["status"] == DSA_COMP_DESC_CNT_ERANGE
    assert batch(rig, 2, list_addr=rig.iova(LIST + 32))["status"] == DSA_COMP_DESCLIST_ALIGN
    nested = [member(rig, 0), pack_desc(opcode=DSA_OPCODE_BATCH, flags=CRAV_RCR, src=rig.iova(LIST), xfer_size=2,
                                        completion_addr=rig.iova(RECS + 32))]
    write_batch(rig, nested)
    assert batch(rig, 2)["status"] == DSA_COMP_BATCH_FAIL
    assert member_status(rig, 1) == DSA_COMP_BAD_OPCODE


def test_batch_list_page_fault(rig):
    window = 0x4_0000_0000
    rig.domain.map(window, rig.mem, LIST - 4096 + 4096, 4096)  # one page of list: 64 descriptors
    write_batch(rig, [member(rig, i) for i in range(70)])
    record = batch(rig, 70, list_addr=window)
    assert record["status"] == DSA_COMP_BATCH_PAGE_FAULT
    assert (record["bytes_completed"], record["fault_addr"]) == (64, window + 4096)
