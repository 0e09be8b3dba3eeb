"""A real host's MachineInfo (luvmm.services): the running kernel, from
/proc and /sys, and one harmless kexec_file_load probe."""

from __future__ import annotations

from liveupdate.kexec import probe_kexec_file_load
from luvmm.services import MachineInfo


class RealMachine(MachineInfo):
    """The running kernel, from /proc and /sys (the kexec probe is one
    syscall: kexec_file_load with no file, which changes nothing)."""

    def kernel_profile(self) -> str | None:
        return None  # a real kernel has no profile: what it offers is what host check finds

    def last_kexec(self) -> dict:
        return {}

    def features(self, device: str | None = None) -> dict:
        import os

        found = {"kho": _kho_enabled(), "kexec_file_load": probe_kexec_file_load(),
                 "iommus": sorted(os.listdir("/sys/class/iommu")) if os.path.isdir("/sys/class/iommu") else []}
        if device:
            base = f"/sys/bus/pci/devices/{device}"
            found["device_exists"] = os.path.isdir(base)
            found["driver"] = _link_name(f"{base}/driver")
            found["iommu_group"] = _link_name(f"{base}/iommu_group")
        return found


def _link_name(path: str) -> str | None:
    import os

    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def _kho_enabled() -> bool | None:
    """kernel/liveupdate/kexec_handover.c: ``kho=`` on the command line over
    CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT; debugfs shows kho/ once enabled."""
    import os

    if os.path.isdir("/sys/kernel/debug/kho"):
        return True
    try:
        with open("/proc/cmdline") as f:
            args = f.read().split()
    except OSError:
        return None
    for arg in reversed(args):
        if arg.startswith("kho="):
            return arg[4:].lower() in ("1", "y", "yes", "on", "true")
    return None  # the config's default, which /proc does not show without debugfs
