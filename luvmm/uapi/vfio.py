"""VFIO device cdev uAPI (include/uapi/linux/vfio.h): the subset luvmm uses.

The cdev model: a device is opened at /dev/vfio/devices/vfioN, bound to an
iommufd (VFIO_DEVICE_BIND_IOMMUFD) and attached to an IOAS or HWPT
(VFIO_DEVICE_ATTACH_IOMMUFD_PT); no VFIO container or group is involved.
"""

from luvmm.abi import _IO, cdef, ioctl, structs

cdef(
    """
    struct vfio_device_info {
        uint32_t argsz;
        uint32_t flags;
        uint32_t num_regions;
        uint32_t num_irqs;
        uint32_t cap_offset;
        uint32_t pad;
    };

    struct vfio_region_info {
        uint32_t argsz;
        uint32_t flags;
        uint32_t index;
        uint32_t cap_offset;
        uint64_t size;
        uint64_t offset;
    };

    struct vfio_info_cap_header {
        uint16_t id;
        uint16_t version;
        uint32_t next;
    };

    struct vfio_region_sparse_mmap_area {
        uint64_t offset;
        uint64_t size;
    };

    struct vfio_region_info_cap_sparse_mmap {
        struct vfio_info_cap_header header;
        uint32_t nr_areas;
        uint32_t reserved;
        struct vfio_region_sparse_mmap_area areas[];
    };

    struct vfio_irq_info {
        uint32_t argsz;
        uint32_t flags;
        uint32_t index;
        uint32_t count;
    };

    struct vfio_irq_set {
        uint32_t argsz;
        uint32_t flags;
        uint32_t index;
        uint32_t start;
        uint32_t count;
        uint8_t data[];
    };

    struct vfio_device_bind_iommufd {
        uint32_t argsz;
        uint32_t flags;
        int32_t iommufd;
        uint32_t out_devid;
        uint64_t token_uuid_ptr;
    };

    struct vfio_device_attach_iommufd_pt {
        uint32_t argsz;
        uint32_t flags;
        uint32_t pt_id;
        uint32_t pasid;
    };

    struct vfio_device_detach_iommufd_pt {
        uint32_t argsz;
        uint32_t flags;
        uint32_t pasid;
    };
    """
)

structs(__name__, "struct vfio_device_info", "struct vfio_region_info", "struct vfio_info_cap_header",
        "struct vfio_region_sparse_mmap_area", "struct vfio_region_info_cap_sparse_mmap", "struct vfio_irq_info",
        "struct vfio_irq_set", "struct vfio_device_bind_iommufd",
        "struct vfio_device_attach_iommufd_pt", "struct vfio_device_detach_iommufd_pt")

VFIO_TYPE = ";"
VFIO_BASE = 100

VFIO_DEVICE_GET_INFO = ioctl("VFIO_DEVICE_GET_INFO", _IO(VFIO_TYPE, VFIO_BASE + 7),
                             "struct vfio_device_info")
VFIO_DEVICE_GET_REGION_INFO = ioctl("VFIO_DEVICE_GET_REGION_INFO", _IO(VFIO_TYPE, VFIO_BASE + 8),
                                    "struct vfio_region_info")
VFIO_DEVICE_GET_IRQ_INFO = ioctl("VFIO_DEVICE_GET_IRQ_INFO", _IO(VFIO_TYPE, VFIO_BASE + 9),
                                 "struct vfio_irq_info")
# The eventfds of SET_IRQS live in the flexible data[] array (DATA_EVENTFD):
# the emulated host reads them from there, not from a named field.
VFIO_DEVICE_SET_IRQS = ioctl("VFIO_DEVICE_SET_IRQS", _IO(VFIO_TYPE, VFIO_BASE + 10),
                             "struct vfio_irq_set")
VFIO_DEVICE_RESET = ioctl("VFIO_DEVICE_RESET", _IO(VFIO_TYPE, VFIO_BASE + 11))
VFIO_DEVICE_BIND_IOMMUFD = ioctl("VFIO_DEVICE_BIND_IOMMUFD", _IO(VFIO_TYPE, VFIO_BASE + 18),
                                 "struct vfio_device_bind_iommufd", fd_fields=("iommufd",))
VFIO_DEVICE_ATTACH_IOMMUFD_PT = ioctl("VFIO_DEVICE_ATTACH_IOMMUFD_PT",
                                      _IO(VFIO_TYPE, VFIO_BASE + 19),
                                      "struct vfio_device_attach_iommufd_pt")
VFIO_DEVICE_DETACH_IOMMUFD_PT = ioctl("VFIO_DEVICE_DETACH_IOMMUFD_PT",
                                      _IO(VFIO_TYPE, VFIO_BASE + 20),
                                      "struct vfio_device_detach_iommufd_pt")

# struct vfio_device_info.flags
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_DEVICE_FLAGS_CAPS = 1 << 7

# struct vfio_region_info.flags
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3

# Region info capabilities (struct vfio_info_cap_header.id), chained from cap_offset.
VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_TYPE = 2
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3

# struct vfio_irq_info.flags
VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3

# struct vfio_irq_set.flags
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
VFIO_IRQ_SET_DATA_TYPE_MASK = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_DATA_EVENTFD
VFIO_IRQ_SET_ACTION_TYPE_MASK = (VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK
                                 | VFIO_IRQ_SET_ACTION_TRIGGER)

# Bind, attach and detach flags.
VFIO_DEVICE_BIND_FLAG_TOKEN = 1 << 0
VFIO_DEVICE_ATTACH_PASID = 1 << 0
VFIO_DEVICE_DETACH_PASID = 1 << 0

# vfio-pci region indices.
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_BAR1_REGION_INDEX = 1
VFIO_PCI_BAR2_REGION_INDEX = 2
VFIO_PCI_BAR3_REGION_INDEX = 3
VFIO_PCI_BAR4_REGION_INDEX = 4
VFIO_PCI_BAR5_REGION_INDEX = 5
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_VGA_REGION_INDEX = 8
VFIO_PCI_NUM_REGIONS = 9

# vfio-pci IRQ indices.
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4
VFIO_PCI_NUM_IRQS = 5

# vfio-pci places region N at offset N << VFIO_PCI_OFFSET_SHIFT of the device fd.
VFIO_PCI_OFFSET_SHIFT = 40
