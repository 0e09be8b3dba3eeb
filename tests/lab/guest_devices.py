"""Runs inside the lab guest (``luvmm lab run``): the VFIO cdev, iommufd and KVM
through luvmm's handles on a real kernel, with QEMU's edu behind the
intel-iommu.  Records what the kernel and the device did in
``devices.json`` in the shared directory; tests/lab/test_lab_devices.py asserts
on it.  Each part is recorded on its own, with the exception it raised, so one
failing part does not hide the others.

    python -m tests.lab.guest_devices
"""

from __future__ import annotations

import fcntl
import mmap
import os
import subprocess
import traceback

from luvmm.abi import ffi
from luvmm.host import RealHost
from luvmm.lab import guest
from luvmm.devices.iommufd import IommuFd
from luvmm.devices.vfio import VfioDevice
from luvmm.uapi.vfio import (
    VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX,
)
from luvmm.liveupdate.luo import LiveUpdate
from tests.lab import edu as E

IOVA = 0x100000          # inside edu's 28-bit DMA mask
RAM = 2 << 20            # the MAP_FILE'd memfd
SRC, DST, FAULT = 0x1000, 0x10000, 0x20000  # offsets in it
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK

results: dict = {}


def part(name):
    def wrap(fn):
        def run(*args):
            try:
                results[name] = fn(*args)
            except Exception as e:  # noqa: BLE001 - recorded for the host-side test
                results[name] = {"exception": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            return results[name]
        return run
    return wrap


def errno_of(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


def kmsg() -> list[str]:
    return subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()


class Rig:
    """The edu device bound to an iommufd, its IOAS with a MAP_FILE'd memfd, a HWPT."""

    def __init__(self, bdf: str):
        self.host = RealHost()
        self.bdf = bdf
        self.dev = VfioDevice.open_bdf(self.host, bdf)
        self.edu = E.Edu(self.dev)
        self.iommufd = IommuFd.open(self.host)
        self.memfd = os.memfd_create("lab-dma", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.memfd, RAM)
        fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, SEALS)
        self.ram = mmap.mmap(self.memfd, RAM)
        self.msi = os.eventfd(0, os.EFD_CLOEXEC)


@part("bind")
def check_bind(rig: Rig) -> dict:
    before = errno_of(rig.dev.get_info)  # a cdev fd does nothing before BIND_IOMMUFD
    rig.devid = rig.dev.bind_iommufd(rig.iommufd)
    info = rig.dev.get_info()
    hw = rig.iommufd.get_hw_info(rig.devid)
    return {"cdev": rig.dev.path, "errno_before_bind": before, "devid": rig.devid, "flags": info.flags,
            "num_regions": info.num_regions, "num_irqs": info.num_irqs, "hw_info_type": hw.out_data_type,
            "second_bind_errno": errno_of(rig.dev.bind_iommufd, rig.iommufd)}


@part("regions")
def check_regions(rig: Rig) -> dict:
    ids = rig.dev.config_read(0, 4)
    bar0 = rig.dev.get_region_info(VFIO_PCI_BAR0_REGION_INDEX)
    config = rig.dev.get_region_info(VFIO_PCI_CONFIG_REGION_INDEX)
    rig.edu.enable_bus_master()
    ident = rig.edu.read(E.ID)
    rig.edu.write(E.LIVENESS, 0x12345678)
    liveness = rig.edu.read(E.LIVENESS)
    return {"vendor": int.from_bytes(ids[:2], "little"), "device": int.from_bytes(ids[2:], "little"),
            "bar0_size": bar0.size, "bar0_flags": bar0.flags, "config_size": config.size,
            "id": ident, "liveness_wrote": 0x12345678, "liveness_read": liveness, "command": rig.edu.command()}


@part("iommu")
def check_iommu(rig: Rig) -> dict:
    rig.ioas = rig.iommufd.ioas_alloc()
    ranges, alignment = rig.iommufd.ioas_iova_ranges(rig.ioas)
    iova = rig.iommufd.ioas_map_file(rig.ioas, rig.memfd, 0, RAM, iova=IOVA)
    rig.hwpt = rig.iommufd.hwpt_alloc(rig.devid, rig.ioas)
    attached = rig.dev.attach_pt(rig.hwpt)
    return {"ranges": ranges, "alignment": alignment, "iova": iova, "hwpt": rig.hwpt, "attached_pt": attached}


@part("dma")
def check_dma(rig: Rig) -> dict:
    """RAM -> edu buffer -> RAM through the vIOMMU, with MSI completions."""
    rig.edu.set_irq_eventfd(VFIO_PCI_MSI_IRQ_INDEX, rig.msi)
    pattern = os.urandom(3072)
    rig.ram[SRC:SRC + len(pattern)] = pattern
    rig.ram[DST:DST + len(pattern)] = b"\0" * len(pattern)
    steps = [rig.edu.dma(IOVA + SRC, E.BUFFER, 2048, False, rig.msi),                 # memfd -> device
             rig.edu.dma(IOVA + SRC + 2048, E.BUFFER + 2048, 1024, False, rig.msi),   # (strictly inside)
             rig.edu.dma(E.BUFFER, IOVA + DST, 3072, True, rig.msi)]                  # device -> memfd
    return {"steps": steps, "pattern": pattern.hex(), "landed": bytes(rig.ram[DST:DST + 3072]).hex(),
            "around": bytes(rig.ram[DST + 3072:DST + 3072 + 64]).hex()}


@part("intx")
def check_intx(rig: Rig) -> dict:
    """INTx: VFIO masks the line when it fires; the driver acks the device and unmasks."""
    rig.edu.disable_irq(VFIO_PCI_MSI_IRQ_INDEX)
    intx = os.eventfd(0, os.EFD_CLOEXEC)
    rig.edu.set_irq_eventfd(VFIO_PCI_INTX_IRQ_INDEX, intx)
    seen = []
    for value in (0x1, 0x2):
        rig.edu.write(E.IRQ_RAISE, value)
        fired = E.wait_eventfd(intx, 20)
        status = rig.edu.read(E.IRQ_STATUS)
        rig.edu.write(E.IRQ_ACK, status)
        rig.edu.unmask(VFIO_PCI_INTX_IRQ_INDEX)
        seen.append({"raised": value, "interrupts": fired, "irq_status": status})
    rig.edu.disable_irq(VFIO_PCI_INTX_IRQ_INDEX)
    info = rig.dev.get_irq_info(VFIO_PCI_INTX_IRQ_INDEX)
    return {"seen": seen, "intx_flags": info.flags, "intx_count": info.count}


@part("fault")
def check_fault(rig: Rig) -> dict:
    """Unmap the IOVA range, have the device write there: nothing lands, the vIOMMU faults."""
    rig.edu.set_irq_eventfd(VFIO_PCI_MSI_IRQ_INDEX, rig.msi)
    sentinel = b"\x5a" * 1024
    rig.ram[FAULT:FAULT + 1024] = sentinel
    unmapped = rig.iommufd.ioas_unmap(rig.ioas, IOVA, RAM)
    before = len(kmsg())
    step = rig.edu.dma(E.BUFFER, IOVA + FAULT, 1024, True, rig.msi)
    lines = [line for line in kmsg()[before:] if "DMAR" in line or "fault" in line.lower()]
    return {"unmapped": unmapped, "step": step, "after": bytes(rig.ram[FAULT:FAULT + 1024]).hex(),
            "sentinel": sentinel.hex(), "kmsg": lines, "fault_addr": IOVA + FAULT}


@part("reset")
def check_reset(rig: Rig) -> dict:
    """VFIO_DEVICE_RESET, then the device works again through a fresh mapping."""
    info = rig.dev.get_info()
    try:
        method = open(f"/sys/bus/pci/devices/{rig.bdf}/reset_method").read().strip()
    except OSError:
        method = None
    result = errno_of(rig.dev.reset)
    rig.iommufd.ioas_map_file(rig.ioas, rig.memfd, 0, RAM, iova=IOVA)
    rig.edu.enable_bus_master()
    rig.edu.set_irq_eventfd(VFIO_PCI_MSI_IRQ_INDEX, rig.msi)
    pattern = os.urandom(512)
    rig.ram[SRC:SRC + 512] = pattern
    rig.ram[DST:DST + 512] = b"\0" * 512
    steps = [rig.edu.dma(IOVA + SRC, E.BUFFER + 64, 512, False, rig.msi),
             rig.edu.dma(E.BUFFER + 64, IOVA + DST, 512, True, rig.msi)]
    return {"flags": info.flags, "reset_method": method, "reset_errno": result, "steps": steps,
            "pattern": pattern.hex(), "landed": bytes(rig.ram[DST:DST + 512]).hex()}


@part("luo_facts")
def check_luo_facts(rig: Rig) -> dict:
    """What mainline answers when asked to preserve what luvmm would preserve."""
    from luvmm.uapi.iommufd import IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE  # provisional: not in mainline

    luo = LiveUpdate.open(rig.host)
    session = luo.create_session("lab-facts")
    out = {"preserve_vfio_cdev": errno_of(session.preserve_fd, rig.dev.fd, 0x12),
           "preserve_iommufd": errno_of(session.preserve_fd, rig.iommufd.fd, 0x11),
           "preserve_memfd": errno_of(session.preserve_fd, rig.memfd, 0x10),
           "hwpt_mark_preserve": errno_of(rig.iommufd.hwpt_liveupdate_mark_preserve, rig.hwpt, 0x14),
           "hwpt_mark_preserve_number": int(IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE)}
    session.close()
    luo.close()
    return out


@part("lazy_pin")
def check_lazy_pin(rig: Rig) -> dict:
    """IOAS_MAP of a user VA with nothing mapped there: accepted; the pin fails later."""
    hole = mmap.mmap(-1, 1 << 20)
    va = int(ffi.cast("uintptr_t", ffi.from_buffer(hole)))
    hole.close()  # the range is unmapped now
    ioas = rig.iommufd.ioas_alloc()
    map_errno = errno_of(rig.iommufd.ioas_map, ioas, va, 1 << 20, 0x400000)
    alloc_errno = errno_of(rig.iommufd.hwpt_alloc, rig.devid, ioas)
    return {"ioas_map_errno": map_errno, "hwpt_alloc_errno": alloc_errno}


@part("kvm_sregs")
def check_kvm_sregs() -> dict:
    """Which long-mode KVM_SET_SREGS standard KVM refuses, and why (kvm_is_valid_sregs)."""
    from luvmm.vmm.kvm import Kvm
    from luvmm.vmm.x86 import setup_cpuid, setup_long_mode

    kvm = Kvm()
    module = [m for m in ("kvm_amd", "kvm_intel", "kvm_pvm") if os.path.isdir(f"/sys/module/{m}")]

    def attempt(cpuid: str) -> int:
        vm = kvm.create_vm()
        vcpu = vm.create_vcpu(0)
        if cpuid == "supported":
            setup_cpuid(vcpu)
        elif cpuid == "no-lm":
            table_bytes = kvm.get_supported_cpuid()
            table = ffi.from_buffer("struct kvm_cpuid2 *", table_bytes)
            for i in range(table.nent):
                if table.entries[i].function == 0x80000001:
                    table.entries[i].edx &= ~(1 << 29)  # CPUID.80000001H:EDX.LM
            ffi.release(table)
            vcpu.set_cpuid2(table_bytes)
        sregs = vcpu.get_sregs()
        setup_long_mode(sregs, 0x1000, cpl=3)
        result = errno_of(vcpu.set_sregs, sregs)
        vcpu.close()
        vm.close()
        return result

    return {"modules": module, "no_cpuid": attempt("none"), "supported_cpuid": attempt("supported"),
            "cpuid_without_lm": attempt("no-lm")}


def main() -> int:
    bdfs = guest.devices()
    results["devices"] = bdfs
    results["release"] = os.uname().release
    if bdfs:
        rig = Rig(bdfs[0])
        for check in (check_bind, check_regions, check_iommu, check_dma, check_intx, check_fault, check_reset,
                      check_luo_facts, check_lazy_pin):
            check(rig)
    check_kvm_sregs()
    guest.save("devices.json", results)
    failed = [k for k, v in results.items() if isinstance(v, dict) and "exception" in v]
    for name in failed:
        print(f"{name}: {results[name]['exception']}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
