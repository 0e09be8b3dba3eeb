"""Intel DSA descriptor and completion record (include/uapi/linux/idxd.h).

The 64-byte descriptor and 32-byte completion record are what software
writes to a portal and what the device writes back to memory; names are the
kernel's.  The engine decodes descriptors with precompiled ``struct.Struct``
formats (faster than cffi attribute access on the hot path);
tests check that their offsets equal the cffi layout below.
"""

import struct

from luvmm.abi import cdef, structs

cdef(
    """
    struct dsa_hw_desc {
        uint32_t pasid:20;
        uint32_t rsvd:11;
        uint32_t priv:1;
        uint32_t flags:24;
        uint32_t opcode:8;
        uint64_t completion_addr;
        union {
            uint64_t src_addr;
            uint64_t rdback_addr;
            uint64_t pattern;
            uint64_t desc_list_addr;
            uint64_t pattern_lower;
            uint64_t transl_fetch_addr;
        };
        union {
            uint64_t dst_addr;
            uint64_t rdback_addr2;
            uint64_t src2_addr;
            uint64_t comp_pattern;
        };
        union {
            uint32_t xfer_size;
            uint32_t desc_count;
            uint32_t region_size;
        };
        uint16_t int_handle;
        uint16_t rsvd1;
        union {
            uint8_t expected_res;
            struct {
                uint64_t delta_addr;
                uint32_t max_delta_size;
                uint32_t delt_rsvd;
                uint8_t expected_res_mask;
            };
            uint32_t delta_rec_size;
            uint64_t dest2;
            struct {
                uint32_t crc_seed;
                uint32_t crc_rsvd;
                uint64_t seed_addr;
            };
            uint64_t pattern_upper;
            uint8_t op_specific[24];
        };
    };

    struct dsa_completion_record {
        uint8_t status;
        union {
            uint8_t result;
            uint8_t dif_status;
        };
        uint8_t fault_info;
        uint8_t rsvd;
        union {
            uint32_t bytes_completed;
            uint32_t descs_completed;
        };
        uint64_t fault_addr;
        union {
            struct {
                uint32_t invalid_flags:24;
                uint32_t rsvd2:8;
            };
            uint32_t delta_rec_size;
            uint64_t crc_val;
            uint8_t op_specific[16];
        };
    };
    """,
    packed=True,
)

structs(__name__, "struct dsa_hw_desc", "struct dsa_completion_record")

# Opcodes (enum dsa_opcode).
DSA_OPCODE_NOOP = 0x00
DSA_OPCODE_BATCH = 0x01
DSA_OPCODE_DRAIN = 0x02
DSA_OPCODE_MEMMOVE = 0x03
DSA_OPCODE_MEMFILL = 0x04
DSA_OPCODE_COMPARE = 0x05
DSA_OPCODE_COMPVAL = 0x06
DSA_OPCODE_CR_DELTA = 0x07
DSA_OPCODE_AP_DELTA = 0x08
DSA_OPCODE_DUALCAST = 0x09
DSA_OPCODE_TRANSL_FETCH = 0x0A
DSA_OPCODE_CRCGEN = 0x10
DSA_OPCODE_COPY_CRC = 0x11
DSA_OPCODE_DIF_CHECK = 0x12
DSA_OPCODE_DIF_INS = 0x13
DSA_OPCODE_DIF_STRP = 0x14
DSA_OPCODE_DIF_UPDT = 0x15
DSA_OPCODE_DIX_GEN = 0x17
DSA_OPCODE_CFLUSH = 0x20

# Descriptor flags.
IDXD_OP_FLAG_FENCE = 0x0001
IDXD_OP_FLAG_BOF = 0x0002
IDXD_OP_FLAG_CRAV = 0x0004
IDXD_OP_FLAG_RCR = 0x0008
IDXD_OP_FLAG_RCI = 0x0010
IDXD_OP_FLAG_CRSTS = 0x0020
IDXD_OP_FLAG_CR = 0x0080
IDXD_OP_FLAG_CC = 0x0100
IDXD_OP_FLAG_ADDR1_TCS = 0x0200
IDXD_OP_FLAG_ADDR2_TCS = 0x0400
IDXD_OP_FLAG_ADDR3_TCS = 0x0800
IDXD_OP_FLAG_CR_TCS = 0x1000
IDXD_OP_FLAG_STORD = 0x2000
IDXD_OP_FLAG_DRDBK = 0x4000
IDXD_OP_FLAG_DSTS = 0x8000

# Completion status codes (enum dsa_completion_status).
DSA_COMP_NONE = 0x00
DSA_COMP_SUCCESS = 0x01
DSA_COMP_SUCCESS_PRED = 0x02
DSA_COMP_PAGE_FAULT_NOBOF = 0x03
DSA_COMP_PAGE_FAULT_IR = 0x04
DSA_COMP_BATCH_FAIL = 0x05
DSA_COMP_BATCH_PAGE_FAULT = 0x06
DSA_COMP_DR_OFFSET_NOINC = 0x07
DSA_COMP_DR_OFFSET_ERANGE = 0x08
DSA_COMP_DIF_ERR = 0x09
DSA_COMP_BAD_OPCODE = 0x10
DSA_COMP_INVALID_FLAGS = 0x11
DSA_COMP_NOZERO_RESERVE = 0x12
DSA_COMP_XFER_ERANGE = 0x13
DSA_COMP_DESC_CNT_ERANGE = 0x14
DSA_COMP_DR_ERANGE = 0x15
DSA_COMP_OVERLAP_BUFFERS = 0x16
DSA_COMP_DCAST_ERR = 0x17
DSA_COMP_DESCLIST_ALIGN = 0x18
DSA_COMP_INT_HANDLE_INVAL = 0x19
DSA_COMP_CRA_XLAT = 0x1A
DSA_COMP_CRA_ALIGN = 0x1B
DSA_COMP_ADDR_ALIGN = 0x1C
DSA_COMP_PRIV_BAD = 0x1D
DSA_COMP_TRAFFIC_CLASS_CONF = 0x1E
DSA_COMP_PFAULT_RDBA = 0x1F
DSA_COMP_HW_ERR1 = 0x20
DSA_COMP_HW_ERR_DRB = 0x21
DSA_COMP_TRANSLATION_FAIL = 0x22

DSA_COMP_STATUS_MASK = 0x7F
DSA_COMP_STATUS_WRITE = 0x80


def DSA_COMP_STATUS(status: int) -> int:
    return status & DSA_COMP_STATUS_MASK


DSA_DESC_SIZE = 64
DSA_COMP_RECORD_SIZE = 32

#: Descriptor decode: pasid/priv word, flags|opcode word, completion_addr,
#: src (or pattern, desc_list_addr), dst (or src2, comp_pattern),
#: xfer_size (or desc_count), int_handle, rsvd1, 24 bytes op-specific.
DESC = struct.Struct("<IIQQQIHH24s")
#: Op-specific views: expected_res (u8); crc_seed, crc_rsvd, seed_addr; dest2;
#: delta_addr, max_delta_size, delt_rsvd, expected_res_mask.
OP_CRC = struct.Struct("<IIQ")
OP_U64 = struct.Struct("<Q")
OP_DELTA = struct.Struct("<QIIB")
#: Completion record: status, result, fault_info, rsvd, bytes_completed, fault_addr, op-specific.
COMP = struct.Struct("<BBBBIQ16s")


def pack_desc(*, opcode: int, flags: int = 0, priv: int = 0, pasid: int = 0, completion_addr: int = 0,
              src: int = 0, dst: int = 0, xfer_size: int = 0, int_handle: int = 0,
              op_specific: bytes = b"") -> bytes:
    """Build a 64-byte descriptor (what a driver writes to a portal)."""
    return DESC.pack(pasid | (priv << 31), (flags & 0xFFFFFF) | (opcode << 24), completion_addr, src, dst,
                     xfer_size, int_handle, 0, op_specific.ljust(24, b"\0"))


def unpack_completion(raw: bytes) -> dict:
    status, result, fault_info, _, completed, fault_addr, rest = COMP.unpack_from(raw)
    return {"status": status, "result": result, "fault_info": fault_info, "bytes_completed": completed,
            "fault_addr": fault_addr, "op_specific": rest}
