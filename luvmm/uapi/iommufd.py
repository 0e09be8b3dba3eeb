"""iommufd uAPI (include/uapi/linux/iommufd.h): the subset luvmm uses, plus the
provisional live-update mark of the out-of-tree iommufd preservation series.
"""

from luvmm.abi import _IO, cdef, ioctl, structs

cdef(
    """
    struct iommu_destroy {
        uint32_t size;
        uint32_t id;
    };

    struct iommu_ioas_alloc {
        uint32_t size;
        uint32_t flags;
        uint32_t out_ioas_id;
    };

    struct iommu_iova_range {
        uint64_t start;
        uint64_t last;
    };

    struct iommu_ioas_iova_ranges {
        uint32_t size;
        uint32_t ioas_id;
        uint32_t num_iovas;
        uint32_t __reserved;
        uint64_t allowed_iovas;
        uint64_t out_iova_alignment;
    };

    struct iommu_ioas_map {
        uint32_t size;
        uint32_t flags;
        uint32_t ioas_id;
        uint32_t __reserved;
        uint64_t user_va;
        uint64_t length;
        uint64_t iova;
    };

    struct iommu_ioas_map_file {
        uint32_t size;
        uint32_t flags;
        uint32_t ioas_id;
        int32_t fd;
        uint64_t start;
        uint64_t length;
        uint64_t iova;
    };

    struct iommu_ioas_unmap {
        uint32_t size;
        uint32_t ioas_id;
        uint64_t iova;
        uint64_t length;
    };

    struct iommu_hwpt_alloc {
        uint32_t size;
        uint32_t flags;
        uint32_t dev_id;
        uint32_t pt_id;
        uint32_t out_hwpt_id;
        uint32_t __reserved;
        uint32_t data_type;
        uint32_t data_len;
        uint64_t data_uptr;
        uint32_t fault_id;
        uint32_t __reserved2;
    };

    struct iommu_hw_info {
        uint32_t size;
        uint32_t flags;
        uint32_t dev_id;
        uint32_t data_len;
        uint64_t data_uptr;
        union {
            uint32_t in_data_type;
            uint32_t out_data_type;
        };
        uint8_t out_max_pasid_log2;
        uint8_t __reserved[3];
        uint64_t out_capabilities;
    };

    /* Provisional (not merged): see IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE below. */
    struct iommu_hwpt_liveupdate_mark_preserve {
        uint32_t size;
        uint32_t hwpt_id;
        uint64_t hwpt_token;
    };
    """
)

structs(__name__, "struct iommu_destroy", "struct iommu_ioas_alloc", "struct iommu_iova_range",
        "struct iommu_ioas_iova_ranges", "struct iommu_ioas_map", "struct iommu_ioas_map_file",
        "struct iommu_ioas_unmap", "struct iommu_hwpt_alloc", "struct iommu_hw_info",
        "struct iommu_hwpt_liveupdate_mark_preserve")

IOMMUFD_TYPE = ";"

IOMMUFD_CMD_BASE = 0x80
IOMMUFD_CMD_DESTROY = IOMMUFD_CMD_BASE
IOMMUFD_CMD_IOAS_ALLOC = 0x81
IOMMUFD_CMD_IOAS_ALLOW_IOVAS = 0x82
IOMMUFD_CMD_IOAS_COPY = 0x83
IOMMUFD_CMD_IOAS_IOVA_RANGES = 0x84
IOMMUFD_CMD_IOAS_MAP = 0x85
IOMMUFD_CMD_IOAS_UNMAP = 0x86
IOMMUFD_CMD_OPTION = 0x87
IOMMUFD_CMD_VFIO_IOAS = 0x88
IOMMUFD_CMD_HWPT_ALLOC = 0x89
IOMMUFD_CMD_GET_HW_INFO = 0x8A
IOMMUFD_CMD_IOAS_MAP_FILE = 0x8F
# The one place the provisional live-update command number lives.  Khawaja's
# iommufd preservation series is not merged; when it is, change it here (and
# the struct above) and `luvmm uapi` will show the new value.  It was 0x95,
# the next free number in 7.2 -- which Linux 7.3 gave to
# IOMMUFD_CMD_IOAS_NOIOMMU_GET_PA (7.3's highest command).  Mainline allocates
# iommufd commands one after the other from IOMMUFD_CMD_BASE (0x80), so a
# provisional number must sit well clear of that sequence: 0xC0 leaves 0x2A
# numbers for upstream to use first, and stays an 8-bit _IOC_NR.  No released
# kernel's iommufd.h defines it (tests/lab/test_lab_conformance_dev.py checks
# the lab kernel's headers); a mainline kernel answers it with ENOTTY
# (main.c iommufd_fops_ioctl: past the table, to iommufd_vfio_ioctl).
IOMMUFD_CMD_HWPT_LIVEUPDATE_MARK_PRESERVE = 0xC0

IOMMU_DESTROY = ioctl("IOMMU_DESTROY", _IO(IOMMUFD_TYPE, IOMMUFD_CMD_DESTROY), "struct iommu_destroy")
IOMMU_IOAS_ALLOC = ioctl("IOMMU_IOAS_ALLOC", _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_ALLOC),
                         "struct iommu_ioas_alloc")
IOMMU_IOAS_IOVA_RANGES = ioctl("IOMMU_IOAS_IOVA_RANGES",
                               _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_IOVA_RANGES),
                               "struct iommu_ioas_iova_ranges",
                               user_out_buffers=(("allowed_iovas", "num_iovas", "struct iommu_iova_range"),))
IOMMU_IOAS_MAP = ioctl("IOMMU_IOAS_MAP", _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP),
                       "struct iommu_ioas_map")
IOMMU_IOAS_MAP_FILE = ioctl("IOMMU_IOAS_MAP_FILE", _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_MAP_FILE),
                            "struct iommu_ioas_map_file", fd_fields=("fd",))
IOMMU_IOAS_UNMAP = ioctl("IOMMU_IOAS_UNMAP", _IO(IOMMUFD_TYPE, IOMMUFD_CMD_IOAS_UNMAP),
                         "struct iommu_ioas_unmap")
IOMMU_HWPT_ALLOC = ioctl("IOMMU_HWPT_ALLOC", _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_ALLOC),
                         "struct iommu_hwpt_alloc")
IOMMU_GET_HW_INFO = ioctl("IOMMU_GET_HW_INFO", _IO(IOMMUFD_TYPE, IOMMUFD_CMD_GET_HW_INFO),
                          "struct iommu_hw_info")
IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE = ioctl(
    "IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE",
    _IO(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_LIVEUPDATE_MARK_PRESERVE),
    "struct iommu_hwpt_liveupdate_mark_preserve")
PROVISIONAL = frozenset({"IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE",
                         "struct iommu_hwpt_liveupdate_mark_preserve"})

# enum iommufd_ioas_map_flags
IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
IOMMU_IOAS_MAP_READABLE = 1 << 2

# enum iommufd_hwpt_alloc_flags
IOMMU_HWPT_ALLOC_NEST_PARENT = 1 << 0
IOMMU_HWPT_ALLOC_DIRTY_TRACKING = 1 << 1
IOMMU_HWPT_FAULT_ID_VALID = 1 << 2
IOMMU_HWPT_ALLOC_PASID = 1 << 3

# enum iommu_hwpt_data_type
IOMMU_HWPT_DATA_NONE = 0
IOMMU_HWPT_DATA_VTD_S1 = 1

# enum iommu_hw_info_type
IOMMU_HW_INFO_TYPE_NONE = 0
IOMMU_HW_INFO_TYPE_INTEL_VTD = 1
