/*
 * Prints, as one JSON object, the ioctl numbers and struct sizes that luvmm
 * models, computed by the C compiler from the kernel's own uAPI headers.
 * tests/test_uapi.py compiles it against the headers it can find and checks
 * that `luvmm uapi --json` agrees with every value printed.
 *
 *   gcc -I<kernel-headers> -o uapi_ref uapi_ref.c && ./uapi_ref
 *
 * linux-7.2.json beside it is its output against the Linux 7.2 headers (Debian's
 * linux-source-7.2 7.2.13, as `luvmm lab build` installs them).
 */
#include <stdio.h>
#include <linux/kvm.h>
#if __has_include(<linux/vfio.h>)
#include <linux/vfio.h>
#endif
#if __has_include(<linux/iommufd.h>)
#include <linux/iommufd.h>
#endif
#if __has_include(<linux/idxd.h>)
#include <linux/idxd.h>
#define HAVE_IDXD 1
#endif
#if __has_include(<linux/liveupdate.h>)
#include <linux/liveupdate.h>
#endif

static int first = 1;
static void item(const char *key, unsigned long value)
{
	printf("%s\n  \"%s\": %lu", first ? "{" : ",", key, value);
	first = 0;
}
#define IOCTL(name) item(#name, (unsigned long)(name))
#define SIZE(s) item("sizeof(struct " #s ")", sizeof(struct s))

int main(void)
{
	IOCTL(KVM_GET_API_VERSION);
	IOCTL(KVM_CREATE_VM);
	IOCTL(KVM_CHECK_EXTENSION);
	IOCTL(KVM_GET_VCPU_MMAP_SIZE);
	IOCTL(KVM_GET_SUPPORTED_CPUID);
	IOCTL(KVM_CREATE_VCPU);
	IOCTL(KVM_SET_USER_MEMORY_REGION);
	IOCTL(KVM_CREATE_IRQCHIP);
	IOCTL(KVM_IRQFD);
	IOCTL(KVM_IOEVENTFD);
	IOCTL(KVM_ENABLE_CAP);
	IOCTL(KVM_RUN);
	IOCTL(KVM_GET_REGS);
	IOCTL(KVM_SET_REGS);
	IOCTL(KVM_GET_SREGS);
	IOCTL(KVM_SET_SREGS);
	IOCTL(KVM_SET_MSRS);
	IOCTL(KVM_SET_DEVICE_ATTR);
	IOCTL(KVM_SET_CPUID2);
	IOCTL(KVM_GET_STATS_FD);
	SIZE(kvm_userspace_memory_region);
	SIZE(kvm_run);
	SIZE(kvm_regs);
	SIZE(kvm_segment);
	SIZE(kvm_dtable);
	SIZE(kvm_sregs);
	SIZE(kvm_irqfd);
	SIZE(kvm_ioeventfd);
	SIZE(kvm_enable_cap);
	SIZE(kvm_cpuid_entry2);
	SIZE(kvm_cpuid2);
	SIZE(kvm_msr_entry);
	SIZE(kvm_msrs);
	SIZE(kvm_device_attr);
	SIZE(kvm_stats_header);
	SIZE(kvm_stats_desc);
#ifdef VFIO_DEVICE_GET_INFO
	IOCTL(VFIO_DEVICE_GET_INFO);
	IOCTL(VFIO_DEVICE_GET_REGION_INFO);
	IOCTL(VFIO_DEVICE_GET_IRQ_INFO);
	IOCTL(VFIO_DEVICE_SET_IRQS);
	IOCTL(VFIO_DEVICE_RESET);
	SIZE(vfio_device_info);
	SIZE(vfio_region_info);
	SIZE(vfio_info_cap_header);
	SIZE(vfio_region_sparse_mmap_area);
	SIZE(vfio_region_info_cap_sparse_mmap);
	SIZE(vfio_irq_info);
	SIZE(vfio_irq_set);
#endif
#ifdef VFIO_DEVICE_BIND_IOMMUFD
	IOCTL(VFIO_DEVICE_BIND_IOMMUFD);
	IOCTL(VFIO_DEVICE_ATTACH_IOMMUFD_PT);
	IOCTL(VFIO_DEVICE_DETACH_IOMMUFD_PT);
	SIZE(vfio_device_bind_iommufd);
	SIZE(vfio_device_attach_iommufd_pt);
	SIZE(vfio_device_detach_iommufd_pt);
#endif
#ifdef IOMMU_IOAS_MAP_FILE
	IOCTL(IOMMU_DESTROY);
	IOCTL(IOMMU_IOAS_ALLOC);
	IOCTL(IOMMU_IOAS_IOVA_RANGES);
	IOCTL(IOMMU_IOAS_MAP);
	IOCTL(IOMMU_IOAS_MAP_FILE);
	IOCTL(IOMMU_IOAS_UNMAP);
	IOCTL(IOMMU_HWPT_ALLOC);
	IOCTL(IOMMU_GET_HW_INFO);
	SIZE(iommu_destroy);
	SIZE(iommu_ioas_alloc);
	SIZE(iommu_iova_range);
	SIZE(iommu_ioas_iova_ranges);
	SIZE(iommu_ioas_map);
	SIZE(iommu_ioas_map_file);
	SIZE(iommu_ioas_unmap);
	SIZE(iommu_hwpt_alloc);
	SIZE(iommu_hw_info);
#endif
#ifdef LIVEUPDATE_IOCTL_CREATE_SESSION
	IOCTL(LIVEUPDATE_IOCTL_CREATE_SESSION);
	IOCTL(LIVEUPDATE_IOCTL_RETRIEVE_SESSION);
	IOCTL(LIVEUPDATE_SESSION_PRESERVE_FD);
	IOCTL(LIVEUPDATE_SESSION_RETRIEVE_FD);
	IOCTL(LIVEUPDATE_SESSION_FINISH);
	IOCTL(LIVEUPDATE_SESSION_GET_NAME);
	SIZE(liveupdate_ioctl_create_session);
	SIZE(liveupdate_ioctl_retrieve_session);
	SIZE(liveupdate_session_preserve_fd);
	SIZE(liveupdate_session_retrieve_fd);
	SIZE(liveupdate_session_finish);
	SIZE(liveupdate_session_get_name);
#endif
#ifdef HAVE_IDXD
	SIZE(dsa_hw_desc);
	SIZE(dsa_completion_record);
#endif
	printf("\n}\n");
	return 0;
}
