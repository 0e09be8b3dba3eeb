"""KVM uAPI (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h), x86-64.

Only what luvmm uses; names and layouts are the kernel's.  ``kvm_run`` keeps
every exit the VMM handles (io, mmio, internal/emulation failure) inside the
kernel's 256-byte union and the 2048-byte sync-regs area, so that
``sizeof(struct kvm_run)`` is the kernel's 2352.
"""

from luvmm.abi import _IO, _IOR, _IOW, _IOWR, cdef, ioctl, structs

cdef(
    """
    struct kvm_userspace_memory_region {
        uint32_t slot;
        uint32_t flags;
        uint64_t guest_phys_addr;
        uint64_t memory_size;
        uint64_t userspace_addr;
    };

    struct kvm_regs {
        uint64_t rax, rbx, rcx, rdx;
        uint64_t rsi, rdi, rsp, rbp;
        uint64_t r8, r9, r10, r11;
        uint64_t r12, r13, r14, r15;
        uint64_t rip, rflags;
    };

    struct kvm_segment {
        uint64_t base;
        uint32_t limit;
        uint16_t selector;
        uint8_t type;
        uint8_t present, dpl, db, s, l, g, avl;
        uint8_t unusable;
        uint8_t padding;
    };

    struct kvm_dtable {
        uint64_t base;
        uint16_t limit;
        uint16_t padding[3];
    };

    struct kvm_sregs {
        struct kvm_segment cs, ds, es, fs, gs, ss;
        struct kvm_segment tr, ldt;
        struct kvm_dtable gdt, idt;
        uint64_t cr0, cr2, cr3, cr4, cr8;
        uint64_t efer;
        uint64_t apic_base;
        uint64_t interrupt_bitmap[4];   /* (KVM_NR_INTERRUPTS + 63) / 64 */
    };

    struct kvm_cpuid_entry2 {
        uint32_t function;
        uint32_t index;
        uint32_t flags;
        uint32_t eax;
        uint32_t ebx;
        uint32_t ecx;
        uint32_t edx;
        uint32_t padding[3];
    };

    struct kvm_cpuid2 {
        uint32_t nent;
        uint32_t padding;
        struct kvm_cpuid_entry2 entries[];
    };

    struct kvm_msr_entry {
        uint32_t index;
        uint32_t reserved;
        uint64_t data;
    };

    struct kvm_msrs {
        uint32_t nmsrs;
        uint32_t pad;
        struct kvm_msr_entry entries[];
    };

    struct kvm_device_attr {
        uint32_t flags;
        uint32_t group;
        uint64_t attr;
        uint64_t addr;
    };

    struct kvm_stats_header {
        uint32_t flags;
        uint32_t name_size;
        uint32_t num_desc;
        uint32_t id_offset;
        uint32_t desc_offset;
        uint32_t data_offset;
    };

    struct kvm_stats_desc {
        uint32_t flags;
        int16_t exponent;
        uint16_t size;
        uint32_t offset;
        uint32_t bucket_size;
        char name[];
    };

    struct kvm_irqfd {
        uint32_t fd;
        uint32_t gsi;
        uint32_t flags;
        uint32_t resamplefd;
        uint8_t pad[16];
    };

    struct kvm_ioeventfd {
        uint64_t datamatch;
        uint64_t addr;
        uint32_t len;
        int32_t fd;
        uint32_t flags;
        uint8_t pad[36];
    };

    struct kvm_enable_cap {
        uint32_t cap;
        uint32_t flags;
        uint64_t args[4];
        uint8_t pad[64];
    };

    struct kvm_run {
        /* in */
        uint8_t request_interrupt_window;
        uint8_t immediate_exit;
        uint8_t padding1[6];
        /* out */
        uint32_t exit_reason;
        uint8_t ready_for_interrupt_injection;
        uint8_t if_flag;
        uint16_t flags;
        /* in (pre_kvm_run), out (post_kvm_run) */
        uint64_t cr8;
        uint64_t apic_base;
        union {
            struct { uint64_t hardware_exit_reason; } hw;
            struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; } fail_entry;
            struct { uint32_t exception; uint32_t error_code; } ex;
            struct {
                uint8_t direction;
                uint8_t size;
                uint16_t port;
                uint32_t count;
                uint64_t data_offset;
            } io;
            struct {
                uint64_t phys_addr;
                uint8_t data[8];
                uint32_t len;
                uint8_t is_write;
            } mmio;
            struct {
                uint32_t suberror;
                uint32_t ndata;
                uint64_t data[16];
            } internal;
            struct {
                uint32_t suberror;
                uint32_t ndata;
                uint64_t flags;
                uint8_t insn_size;
                uint8_t insn_bytes[15];
            } emulation_failure;
            struct { uint32_t flags; uint32_t reason; } system_event_hdr;
            char padding[256];
        };
        uint64_t kvm_valid_regs;
        uint64_t kvm_dirty_regs;
        union {
            char padding[2048];                 /* SYNC_REGS_SIZE_BYTES */
        } s;
    };
    """
)

structs(__name__, "struct kvm_userspace_memory_region", "struct kvm_run", "struct kvm_regs",
        "struct kvm_segment", "struct kvm_dtable", "struct kvm_sregs", "struct kvm_irqfd",
        "struct kvm_ioeventfd", "struct kvm_enable_cap", "struct kvm_cpuid_entry2", "struct kvm_cpuid2",
        "struct kvm_msr_entry", "struct kvm_msrs", "struct kvm_device_attr", "struct kvm_stats_header",
        "struct kvm_stats_desc")

KVMIO = 0xAE

KVM_GET_API_VERSION = ioctl("KVM_GET_API_VERSION", _IO(KVMIO, 0x00))
KVM_CREATE_VM = ioctl("KVM_CREATE_VM", _IO(KVMIO, 0x01))
KVM_CHECK_EXTENSION = ioctl("KVM_CHECK_EXTENSION", _IO(KVMIO, 0x03))
KVM_GET_VCPU_MMAP_SIZE = ioctl("KVM_GET_VCPU_MMAP_SIZE", _IO(KVMIO, 0x04))
KVM_GET_SUPPORTED_CPUID = ioctl("KVM_GET_SUPPORTED_CPUID", _IOWR(KVMIO, 0x05, "struct kvm_cpuid2"))
KVM_CREATE_VCPU = ioctl("KVM_CREATE_VCPU", _IO(KVMIO, 0x41))
KVM_SET_USER_MEMORY_REGION = ioctl("KVM_SET_USER_MEMORY_REGION",
                                   _IOW(KVMIO, 0x46, "struct kvm_userspace_memory_region"))
KVM_CREATE_IRQCHIP = ioctl("KVM_CREATE_IRQCHIP", _IO(KVMIO, 0x60))
KVM_IRQFD = ioctl("KVM_IRQFD", _IOW(KVMIO, 0x76, "struct kvm_irqfd"),
                  fd_fields=("fd",))
KVM_IOEVENTFD = ioctl("KVM_IOEVENTFD", _IOW(KVMIO, 0x79, "struct kvm_ioeventfd"),
                      fd_fields=("fd",))
KVM_ENABLE_CAP = ioctl("KVM_ENABLE_CAP", _IOW(KVMIO, 0xa3, "struct kvm_enable_cap"))
KVM_RUN = ioctl("KVM_RUN", _IO(KVMIO, 0x80))
KVM_GET_REGS = ioctl("KVM_GET_REGS", _IOR(KVMIO, 0x81, "struct kvm_regs"))
KVM_SET_REGS = ioctl("KVM_SET_REGS", _IOW(KVMIO, 0x82, "struct kvm_regs"))
KVM_GET_SREGS = ioctl("KVM_GET_SREGS", _IOR(KVMIO, 0x83, "struct kvm_sregs"))
KVM_SET_SREGS = ioctl("KVM_SET_SREGS", _IOW(KVMIO, 0x84, "struct kvm_sregs"))
KVM_SET_MSRS = ioctl("KVM_SET_MSRS", _IOW(KVMIO, 0x89, "struct kvm_msrs"))
KVM_SET_CPUID2 = ioctl("KVM_SET_CPUID2", _IOW(KVMIO, 0x90, "struct kvm_cpuid2"))
KVM_SET_DEVICE_ATTR = ioctl("KVM_SET_DEVICE_ATTR", _IOW(KVMIO, 0xe1, "struct kvm_device_attr"))
# Returns an fd: a binary stats file (struct kvm_stats_header, descriptors, u64 data).
KVM_GET_STATS_FD = ioctl("KVM_GET_STATS_FD", _IO(KVMIO, 0xce))

KVM_API_VERSION = 12

# KVM_CHECK_EXTENSION capabilities.
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_IRQFD = 32
KVM_CAP_IOEVENTFD = 36
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_BINARY_STATS_FD = 203
KVM_CAP_EXIT_ON_EMULATION_FAILURE = 204

# struct kvm_stats_desc.flags
KVM_STATS_TYPE_SHIFT = 0
KVM_STATS_TYPE_MASK = 0xF << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_CUMULATIVE = 0x0 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_INSTANT = 0x1 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_PEAK = 0x2 << KVM_STATS_TYPE_SHIFT
KVM_STATS_UNIT_SHIFT = 4
KVM_STATS_UNIT_MASK = 0xF << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_NONE = 0x0 << KVM_STATS_UNIT_SHIFT

# exit_reason values.
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_NAMES = {value: name for name, value in globals().items() if name.startswith("KVM_EXIT_")}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

# struct kvm_cpuid_entry2 flags; the most entries KVM takes (arch/x86/include/asm/kvm_host.h).
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0
KVM_MAX_CPUID_ENTRIES = 256

# vCPU device attributes (arch/x86/include/uapi/asm/kvm.h): the TSC's offset from the host's.
KVM_VCPU_TSC_CTRL = 0
KVM_VCPU_TSC_OFFSET = 0

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
