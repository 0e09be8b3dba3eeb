"""What a mainline kernel answers, pinned: the facts the VMM relies on when it
runs on one (`luvmm host check`, the real host's preserve step).  Each errno
comes from the kernel's source (cited) and is checked here on the lab kernel.
Guest side: tests/lab/guest_devices.py."""

import errno

from luvmm.uapi.iommufd import IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE
from tests.lab.parts import part


def test_preserve_fd_of_a_vfio_cdev_and_an_iommufd_is_enoent(dev):
    """kernel/liveupdate/luo_file.c luo_preserve_file: no registered file
    handler's can_preserve() takes the file -> -ENOENT.  Mainline registers
    only memfd's (mm/memfd_luo.c); VFIO and iommufd preservation are the
    out-of-tree series."""
    facts = part(dev, "luo_facts")
    assert facts["preserve_vfio_cdev"] == errno.ENOENT
    assert facts["preserve_iommufd"] == errno.ENOENT
    assert facts["preserve_memfd"] == 0  # the same session takes a (sealed) memfd


def test_the_provisional_hwpt_preserve_ioctl_is_enotty(dev):
    """drivers/iommu/iommufd/main.c iommufd_fops_ioctl: a command number past
    the table goes to iommufd_vfio_ioctl, whose default is -ENOIOCTLCMD
    (ENOTTY to userspace).  So the number luvmm picked for the series is free
    in the lab kernel."""
    facts = part(dev, "luo_facts")
    assert facts["hwpt_mark_preserve_number"] == int(IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE)
    assert facts["hwpt_mark_preserve"] == errno.ENOTTY


def test_ioas_map_of_an_unmapped_va_is_accepted_and_fails_at_hwpt_alloc(dev):
    """drivers/iommu/iommufd/io_pagetable.c: IOAS_MAP records the user VA
    range without pinning it; pages are pinned when a domain is filled
    (iopt_table_add_domain at HWPT_ALLOC), where pin_user_pages fails -EFAULT."""
    lazy = part(dev, "lazy_pin")
    assert lazy["ioas_map_errno"] == 0
    assert lazy["hwpt_alloc_errno"] == errno.EFAULT


def test_standard_kvm_refuses_long_mode_sregs_without_cpuid(dev):
    """arch/x86/kvm/regs.c kvm_is_valid_sregs -> x86.c kvm_valid_efer:
    EFER.LME/LMA need guest CPUID LM, and a fresh vCPU has no CPUID: -EINVAL.
    luvmm.vmm.x86.setup_cpuid (KVM_SET_CPUID2 of KVM_GET_SUPPORTED_CPUID) makes the
    VMM's set-up valid; without the LM bit it is refused again."""
    kvm = part(dev, "kvm_sregs")
    assert "kvm_amd" in kvm["modules"] or "kvm_intel" in kvm["modules"]  # a standard KVM, not KVM-PVM
    assert kvm["no_cpuid"] == errno.EINVAL
    assert kvm["supported_cpuid"] == 0
    assert kvm["cpuid_without_lm"] == errno.EINVAL
