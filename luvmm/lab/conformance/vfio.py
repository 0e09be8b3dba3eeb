"""The VFIO cdev and vfio-pci (drivers/vfio): conformance cases (luvmm.lab.conformance).

Every errno is the one the cited kernel function returns (Linux 7.2), and
the lab's real kernel confirmed it.  The cases ask the kernel (region and
IRQ info, config space) for what they need, and report facts that hold for
any vfio-pci function -- the emulated DSA (PCIe, MSI-X, FLR) and QEMU's edu
(conventional PCI, MSI, a bus reset) alike.
"""

from __future__ import annotations

import struct

from luvmm.devices.iommufd import IommuFd
from luvmm.devices.vfio import VfioDevice
from luvmm.abi import new_arg
from luvmm.lab.conformance import case, errno_of
from luvmm.uapi.pci_regs import (
    PCI_CAP_ID_EXP,
    PCI_CAPABILITY_LIST,
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_INTERRUPT_PIN,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
)
from luvmm.uapi.vfio import (
    VFIO_DEVICE_BIND_IOMMUFD,
    VFIO_DEVICE_FLAGS_PCI,
    VFIO_DEVICE_FLAGS_RESET,
    VFIO_DEVICE_GET_INFO,
    VFIO_DEVICE_GET_IRQ_INFO,
    VFIO_DEVICE_GET_REGION_INFO,
    VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_INFO_NORESIZE,
    VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_BAR5_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_ERR_IRQ_INDEX,
    VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_NUM_IRQS,
    VFIO_PCI_OFFSET_SHIFT,
    VFIO_PCI_REQ_IRQ_INDEX,
)


def _open(ctx) -> VfioDevice:
    dev = VfioDevice.open_bdf(ctx.host, ctx.device)
    ctx.track(dev.fd)
    return dev


def _bound(ctx) -> tuple[VfioDevice, IommuFd]:
    dev = _open(ctx)
    ifd = IommuFd.open(ctx.host)
    ctx.track(ifd.fd)
    dev.bind_iommufd(ifd)
    return dev, ifd


def _bind_errno(ctx, dev: VfioDevice, iommufd: int, **fields) -> int:
    arg = new_arg("struct vfio_device_bind_iommufd", iommufd=iommufd, **fields)
    return errno_of(dev.ioctl, VFIO_DEVICE_BIND_IOMMUFD, arg)


def _command(dev: VfioDevice) -> int:
    return struct.unpack("<H", dev.config_read(PCI_COMMAND, 2))[0]


def _has_cap(dev: VfioDevice, cap_id: int) -> bool:
    """Walk the standard capability list (through vfio-pci's virtual config space)."""
    if not struct.unpack("<H", dev.config_read(PCI_STATUS, 2))[0] & PCI_STATUS_CAP_LIST:
        return False
    pos, seen = dev.config_read(PCI_CAPABILITY_LIST, 1)[0] & ~3, set()
    while pos and pos not in seen:
        seen.add(pos)
        ident, nxt = dev.config_read(pos, 2)
        if ident == cap_id:
            return True
        pos = nxt & ~3
    return False


def _first_bar(dev: VfioDevice):
    for index in range(VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_BAR5_REGION_INDEX + 1):
        info = dev.get_region_info(index)
        if info.size:
            return info
    raise AssertionError("the function has no BAR")


# --- before BIND_IOMMUFD ---------------------------------------------------------------------------


@case("vfio", device=True)
def case_before_bind(ctx):
    """vfio_main.c vfio_device_fops_unl_ioctl / _read / _write: until
    BIND_IOMMUFD granted access (df->access_granted), every ioctl but the
    bind, and every read and write, is -EINVAL."""
    dev = _open(ctx)
    config = VFIO_PCI_CONFIG_REGION_INDEX << VFIO_PCI_OFFSET_SHIFT  # where vfio-pci puts the config region
    return {"get_info": errno_of(dev.get_info),
            "get_region_info": errno_of(dev.get_region_info, VFIO_PCI_CONFIG_REGION_INDEX),
            "get_irq_info": errno_of(dev.get_irq_info, VFIO_PCI_INTX_IRQ_INDEX),
            "reset": errno_of(dev.reset),
            "pread": errno_of(ctx.host.pread, dev.fd, 4, config),
            "pwrite": errno_of(ctx.host.pwrite, dev.fd, bytes(4), config)}


@case("vfio", device=True)
def case_bind_iommufd_bad_fd(ctx):
    """device_cdev.c vfio_df_ioctl_bind_iommufd: a negative iommufd (or an
    unknown flag) is -EINVAL before any fd lookup; argsz below offsetofend
    of out_devid -EINVAL; an fd that is not an iommufd -EBADFD
    (iommufd_ctx_from_fd); binding the same fd twice -EINVAL."""
    dev = _open(ctx)
    other = _open(ctx)  # a VFIO cdev fd: an open file that is not an iommufd
    ifd = IommuFd.open(ctx.host)
    ctx.track(ifd.fd)
    out = {"negative": _bind_errno(ctx, dev, -1),
           "unknown_flag": _bind_errno(ctx, dev, ifd.fd, flags=1 << 1),
           "argsz_small": _bind_errno(ctx, dev, ifd.fd, argsz=8),
           "not_an_iommufd": _bind_errno(ctx, dev, other.fd)}
    out["bind"] = _bind_errno(ctx, dev, ifd.fd)
    out["twice"] = _bind_errno(ctx, dev, ifd.fd)
    return out


# --- GET_INFO and regions ----------------------------------------------------------------------------


@case("vfio", device=True)
def case_get_info(ctx):
    """vfio_pci_core.c vfio_pci_ioctl_get_info: VFIO_DEVICE_FLAGS_PCI always,
    VFIO_DEVICE_FLAGS_RESET iff reset_works (and then VFIO_DEVICE_RESET
    works, vfio_pci_ioctl_reset), VFIO_PCI_NUM_REGIONS (+ device-specific
    ones) and VFIO_PCI_NUM_IRQS; argsz below offsetofend of num_irqs -EINVAL."""
    dev, _ = _bound(ctx)
    info = dev.get_info()
    short = new_arg("struct vfio_device_info", argsz=8)
    return {"pci": bool(info.flags & VFIO_DEVICE_FLAGS_PCI),
            "reset_flag_iff_reset_works": bool(info.flags & VFIO_DEVICE_FLAGS_RESET) == (errno_of(dev.reset) == 0),
            "num_regions": info.num_regions, "num_irqs": info.num_irqs,
            "argsz_small": errno_of(dev.ioctl, VFIO_DEVICE_GET_INFO, short)}


@case("vfio", device=True)
def case_region_info_out_of_range(ctx):
    """vfio_pci_core.c vfio_pci_ioctl_get_region_info: an index at or past
    VFIO_PCI_NUM_REGIONS + the device-specific regions is -EINVAL; argsz
    below offsetofend of offset -EINVAL."""
    dev, _ = _bound(ctx)
    regions = dev.get_info().num_regions
    short = new_arg("struct vfio_region_info", argsz=8, index=VFIO_PCI_CONFIG_REGION_INDEX)
    return {"at_num_regions": errno_of(dev.get_region_info, regions),
            "far": errno_of(dev.get_region_info, regions + 1000),
            "argsz_small": errno_of(dev.ioctl, VFIO_DEVICE_GET_REGION_INFO, short),
            "config_readable": errno_of(dev.get_region_info, VFIO_PCI_CONFIG_REGION_INDEX)}


@case("vfio", device=True)
def case_bar_access_past_the_end(ctx):
    """vfio_pci_rdwr.c vfio_pci_bar_rw: an access that starts inside the BAR
    is cut at its end (a short read/write); one that starts at or past the
    end is -EINVAL."""
    dev, _ = _bound(ctx)
    bar = _first_bar(dev)
    end = bar.offset + bar.size

    def read(offset, length):
        try:
            return len(ctx.host.pread(dev.fd, length, offset))
        except OSError as e:
            return {"errno": e.errno}

    return {"straddling_read": read(end - 2, 4), "read_at_end": read(end, 4),
            "inside": read(end - 4, 4)}


@case("vfio", device=True)
def case_config_access_past_the_end(ctx):
    """vfio_pci_config.c vfio_pci_config_rw: an access that does not fit in
    the function's config space (cfg_size, the config region's size) is
    -EFAULT -- no short access, unlike a BAR."""
    dev, _ = _bound(ctx)
    config = dev.get_region_info(VFIO_PCI_CONFIG_REGION_INDEX)
    end = config.offset + config.size

    def access(fn, *args):
        try:
            r = fn(dev.fd, *args)
            return len(r) if isinstance(r, bytes) else r
        except OSError as e:
            return {"errno": e.errno}

    return {"straddling_read": access(ctx.host.pread, 4, end - 2),
            "read_at_end": access(ctx.host.pread, 4, end),
            "straddling_write": access(ctx.host.pwrite, bytes(4), end - 2),
            "last_dword": access(ctx.host.pread, 4, end - 4)}


# --- reset --------------------------------------------------------------------------------------------


@case("vfio", device=True)
def case_reset_restores_config(ctx):
    """vfio_pci_core.c vfio_pci_ioctl_reset -> pci_try_reset_function: the
    PCI core saves the function's config space (pci_dev_save_and_disable),
    resets it, and restores it (pci_dev_restore -> pci_restore_state), so
    the command register -- Memory and Bus Master enable -- reads back as it
    was before the reset."""
    dev, _ = _bound(ctx)
    if not dev.get_info().flags & VFIO_DEVICE_FLAGS_RESET:
        return {"reset": errno_of(dev.reset)}
    bits = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
    dev.config_write(PCI_COMMAND, struct.pack("<H", _command(dev) | bits))
    before = _command(dev) & bits
    reset = errno_of(dev.reset)
    after = _command(dev) & bits
    dev.config_write(PCI_COMMAND, struct.pack("<H", _command(dev) & ~PCI_COMMAND_MASTER))
    return {"before": before, "reset": reset, "after": after}


# --- IRQ info ---------------------------------------------------------------------------------------


@case("vfio", device=True)
def case_irq_info_flags(ctx):
    """vfio_pci_core.c vfio_pci_ioctl_get_irq_info: EVENTFD on every index it
    answers (whatever the count); INTx adds MASKABLE|AUTOMASKED, every other
    index NORESIZE except MSI-X where MSI-X can grow (has_dyn_msix, which
    needs an MSI-X capability); INTx count 1 iff the interrupt pin is set;
    REQ count 1; ERR only on PCIe (else -EINVAL); past the last index -EINVAL
    (vfio_pci_get_irq_count)."""
    dev, _ = _bound(ctx)
    pin = dev.config_read(PCI_INTERRUPT_PIN, 1)[0]
    intx = dev.get_irq_info(VFIO_PCI_INTX_IRQ_INDEX)
    msi = dev.get_irq_info(VFIO_PCI_MSI_IRQ_INDEX)
    msix = dev.get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
    req = dev.get_irq_info(VFIO_PCI_REQ_IRQ_INDEX)
    pcie = _has_cap(dev, PCI_CAP_ID_EXP)
    err = errno_of(dev.get_irq_info, VFIO_PCI_ERR_IRQ_INDEX)
    msix_flags = VFIO_IRQ_INFO_EVENTFD | (0 if msix.count else VFIO_IRQ_INFO_NORESIZE)
    return {"intx_flags": intx.flags, "intx_count_iff_pin": intx.count == (1 if pin else 0),
            "msi_flags": msi.flags, "msix_flags_as_expected": msix.flags == msix_flags,
            "req": [req.flags, req.count], "err_iff_pcie": (err == 0) == pcie,
            "past_the_last": errno_of(dev.get_irq_info, VFIO_PCI_NUM_IRQS),
            "expected": {"intx": VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED,
                         "msi": VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE}}


@case("vfio", device=True)
def case_irq_info_argsz(ctx):
    """vfio_pci_core.c vfio_pci_ioctl_get_irq_info: argsz below offsetofend
    of count is -EINVAL."""
    dev, _ = _bound(ctx)
    short = new_arg("struct vfio_irq_info", argsz=8, index=VFIO_PCI_INTX_IRQ_INDEX)
    return errno_of(dev.ioctl, VFIO_DEVICE_GET_IRQ_INFO, short)

