"""In the lab (a real 7.x kernel under QEMU): the VFIO cdev and iommufd with
QEMU's edu device through luvmm's handles -- bind, regions, IOAS_MAP_FILE,
HWPT_ALLOC, attach, MSI and INTx eventfds, reset -- real DMA by the device
into a MAP_FILE'd memfd through the vIOMMU, and a DMA fault once unmapped.
The guest side is tests/lab/guest_devices.py (one boot for this module)."""

import errno

from luvmm.uapi.iommufd import IOMMU_HW_INFO_TYPE_INTEL_VTD
from luvmm.uapi.vfio import (
    VFIO_DEVICE_FLAGS_PCI,
    VFIO_DEVICE_FLAGS_RESET,
    VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD,
    VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
)
from tests.lab import edu as E
from tests.lab.guest_devices import IOVA, RAM
from tests.lab.parts import part


def test_the_guest_ran_the_lab_kernel_with_an_edu_bound_to_vfio_pci(lab_devices, lab_kernel, dev):
    assert lab_devices.result.status == 0 and lab_devices.result.stages == 1
    assert dev["release"] == lab_kernel["kernelrelease"]
    assert len(dev["devices"]) == 1
    assert dev["_rc"] == "0", dev["_out"][-3000:]


def test_bind_iommufd(dev):
    bind = part(dev, "bind")
    assert bind["cdev"].startswith("/dev/vfio/devices/vfio")
    # drivers/vfio/vfio_main.c vfio_device_fops_unl_ioctl: until BIND_IOMMUFD
    # (!df->access_granted) every other ioctl is EINVAL
    assert bind["errno_before_bind"] == errno.EINVAL
    assert bind["flags"] & VFIO_DEVICE_FLAGS_PCI
    assert bind["num_regions"] >= 9 and bind["num_irqs"] >= 5
    assert bind["hw_info_type"] == IOMMU_HW_INFO_TYPE_INTEL_VTD  # the device really is behind the vIOMMU
    # drivers/vfio/device_cdev.c vfio_df_ioctl_bind_iommufd: a bound fd (df->access_granted) is EINVAL
    assert bind["second_bind_errno"] == errno.EINVAL


def test_region_access(dev):
    regions = part(dev, "regions")
    assert (regions["vendor"], regions["device"]) == (E.VENDOR, E.DEVICE)
    assert regions["bar0_size"] == 1 << 20
    assert regions["bar0_flags"] & VFIO_REGION_INFO_FLAG_READ and regions["bar0_flags"] & VFIO_REGION_INFO_FLAG_WRITE
    assert regions["config_size"] >= 256
    assert regions["id"] == E.ID_VALUE
    assert regions["liveness_read"] == ~regions["liveness_wrote"] & 0xFFFFFFFF  # the device computed it
    assert regions["command"] & E.PCI_COMMAND_MASTER


def test_ioas_map_file_hwpt_alloc_attach(dev):
    iommu = part(dev, "iommu")
    assert iommu["iova"] == IOVA
    assert any(start <= IOVA and IOVA + RAM - 1 <= last for start, last in iommu["ranges"])
    assert iommu["attached_pt"] == iommu["hwpt"]


def test_device_dma_through_the_viommu_into_the_memfd_byte_for_byte(dev):
    dma = part(dev, "dma")
    for step in dma["steps"]:  # each transfer completed with its MSI, the engine idle
        assert step["interrupts"] == 1 and step["irq_status"] & E.DMA_IRQ and not step["busy_after"]
    pattern, landed = bytes.fromhex(dma["pattern"]), bytes.fromhex(dma["landed"])
    assert len(pattern) == len(landed) == 3072
    assert landed == pattern
    assert bytes.fromhex(dma["around"]) == bytes(64)  # and nothing past it


def test_intx_eventfd_masked_acked_unmasked(dev):
    intx = part(dev, "intx")
    assert intx["intx_count"] == 1
    assert intx["intx_flags"] & VFIO_IRQ_INFO_EVENTFD and intx["intx_flags"] & VFIO_IRQ_INFO_AUTOMASKED
    for seen in intx["seen"]:  # the second only arrives because the first was acked and unmasked
        assert seen["interrupts"] == 1 and seen["irq_status"] & seen["raised"]


def test_dma_to_an_unmapped_iova_faults_and_lands_nowhere(dev):
    fault = part(dev, "fault")
    assert fault["unmapped"] == RAM
    assert fault["step"]["interrupts"] == 1  # the device finished (its write was dropped)
    assert fault["after"] == fault["sentinel"]  # the memfd is untouched
    addr = f"{fault['fault_addr']:x}"
    assert any("DMAR" in line and addr in line.lower() for line in fault["kmsg"]), fault["kmsg"]


def test_reset_then_the_device_works_again(dev):
    """The lab puts each edu alone behind a PCIe root port, so the function has
    a reset (a secondary bus reset: the edu has neither FLR nor PM reset)."""
    reset = part(dev, "reset")
    assert reset["reset_method"] == "bus"
    assert reset["flags"] & VFIO_DEVICE_FLAGS_RESET  # vfio_pci_core: reset_works
    assert reset["reset_errno"] == 0
    for step in reset["steps"]:
        assert step["interrupts"] == 1 and not step["busy_after"]
    assert reset["landed"] == reset["pattern"]
