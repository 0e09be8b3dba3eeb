"""What the emulated Intel DSA offers: a Sapphire Rapids DSA (8 WQs, 128 WQ
entries, 4 groups, 4 engines, max transfer 2 GiB, max batch 1024) minus what
the model does not implement -- shared WQs (ENQCMD), block on fault (there is
no page-request interface), PASID, ATS and the ops outside
:data:`OPCAP_SUPPORTED` -- and where it puts its tables in BAR0.  The register
interface itself is :mod:`luvmm.devices.dsa_regs`."""

from luvmm.devices.dsa_regs import (
    GENCAP_CACHE_CONTROL_MEM,
    GENCAP_CMD_CAP,
    GENCAP_CONFIG_EN,
    GENCAP_MAX_BATCH_SHIFT,
    GENCAP_MAX_XFER_SHIFT,
    GENCAP_OVERLAP_COPY,
    IDXD_CMD_ENABLE_DEVICE,
    IDXD_CMD_RESET_WQ,
    IDXD_TABLE_MULT,
    IDXD_WQCFG_MIN,
    WQCAP_DEDICATED_MODE,
    WQCAP_NUM_WQS_SHIFT,
    WQCAP_OCCUPANCY,
    WQCAP_PRIORITY,
    WQCAP_WQCFG_SIZE_SHIFT,
    WQCFG_SIZE,
)

# Where this device puts its tables (TABLE_OFFSET fields are x IDXD_TABLE_MULT).
MSIX_PERM_TABLE = 0x200
GRPCFG_TABLE = 0x300
WQCFG_TABLE = 0x400
MSIX_TABLE = 0x2000
MSIX_PBA = 0x3000
MSIX_VECTORS = 9  # vector 0: misc (errors, commands); 1..8: WQ completions


DSA_OPCODE_BITS_SUPPORTED = (0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x10, 0x11)
OPCAP_SUPPORTED = sum(1 << op for op in DSA_OPCODE_BITS_SUPPORTED)

NUM_WQS = 8
TOTAL_WQ_SIZE = 128
NUM_GROUPS = 4
NUM_ENGINES = 4
TOTAL_RDBUFS = 0x60
MAX_XFER_SHIFT = 31  # 2 GiB
MAX_BATCH_SHIFT = 10  # 1024 descriptors

GENCAP_VALUE = (GENCAP_OVERLAP_COPY | GENCAP_CACHE_CONTROL_MEM | GENCAP_CMD_CAP
                | MAX_XFER_SHIFT << GENCAP_MAX_XFER_SHIFT | MAX_BATCH_SHIFT << GENCAP_MAX_BATCH_SHIFT
                | GENCAP_CONFIG_EN)
WQCAP_VALUE = (TOTAL_WQ_SIZE | NUM_WQS << WQCAP_NUM_WQS_SHIFT | (WQCFG_SIZE.bit_length() - 1 - IDXD_WQCFG_MIN)
               << WQCAP_WQCFG_SIZE_SHIFT | WQCAP_DEDICATED_MODE | WQCAP_PRIORITY | WQCAP_OCCUPANCY)
GRPCAP_VALUE = NUM_GROUPS | TOTAL_RDBUFS << 8
ENGCAP_VALUE = NUM_ENGINES
# The commands this model implements; REQUEST_INT_HANDLE is absent, so
# drivers use MSI-X vector numbers as interrupt handles (as the VFIO
# selftests' DSA driver requires).
CMDCAP_VALUE = sum(1 << c for c in range(IDXD_CMD_ENABLE_DEVICE, IDXD_CMD_RESET_WQ + 1))
TABLE_OFFSET_VALUE = ((GRPCFG_TABLE // IDXD_TABLE_MULT) | (WQCFG_TABLE // IDXD_TABLE_MULT) << 16
                      | (MSIX_PERM_TABLE // IDXD_TABLE_MULT) << 32)
