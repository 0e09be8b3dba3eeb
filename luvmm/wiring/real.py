"""A real host's MachineInfo (luvmm.services): the running kernel, from
/proc and /sys, and one harmless kexec_file_load probe."""

from __future__ import annotations

from luvmm.liveupdate.kexec import probe_kexec_file_load
from luvmm.services import MachineInfo


class RealMachine(MachineInfo):
    """The running kernel, from /proc and /sys (the kexec probe is one
    syscall: kexec_file_load with no file, which changes nothing), and the
    agent's record of the last update in the state dir ``state_dir``."""

    def __init__(self, state_dir: str | None = None):
        self.state_dir = state_dir

    def kernel_profile(self) -> str | None:
        return None  # a real kernel has no profile: what it offers is what host check finds

    def last_kexec(self) -> dict:
        """The last kexec's marks, as a real host can take them (CLOCK_REALTIME):

        * ``frozen``: the agent's reboot(LINUX_REBOOT_CMD_KEXEC) call, from its
          record of the update (luvmm.liveupdate.agent: LUO's freeze, KHO's image
          and the jump happen inside the call, where userspace sees nothing);
        * ``kernel_start``: when this kernel started counting (now minus
          CLOCK_BOOTTIME);
        * ``booted``: the first userspace mark of this boot, pid 1's start.

        So the report's ``kexec`` phase is the new kernel's boot, from the
        reboot call to its first process.  Across the kexec the new kernel's
        CLOCK_REALTIME is not the old one's (it is set at boot from the
        machine's clock: an RTC has whole seconds); ``clock_offset_s`` is
        how far it is, from the TSC, which a kexec does not reset
        (luvmm.liveupdate.tsc): every mark taken in this kernel, these and the
        VMM's, is corrected by it (None: the TSC could not say, and the
        marks are as the clocks read).  ``clock`` says which.  {} when no
        update's record says it rebooted."""
        import json
        import os
        import time

        if not self.state_dir:
            return {}
        try:
            with open(os.path.join(self.state_dir, "agent", "update.json")) as f:
                record = json.load(f)
            reboot_at = float(record["reboot_at"])
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            return {}
        from luvmm.liveupdate import tsc

        before = record.get("reboot_tsc") if isinstance(record.get("reboot_tsc"), dict) else {}
        offset = tsc.clock_offset(before, record.get("tsc_hz"))
        kernel_start = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + (offset or 0.0)
        marks = {"frozen": reboot_at, "kernel_start": kernel_start}
        try:
            with open("/proc/1/stat") as f:
                ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # starttime, in clock ticks since boot
            marks["booted"] = kernel_start + ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
        if offset is None:
            clock = "CLOCK_REALTIME of each kernel (the new one sets it at boot from the machine's clock)"
        else:
            clock = (f"CLOCK_REALTIME of the old kernel; the new kernel's marks corrected by {offset:+.3f} s from "
                     f"the TSC ({'invariant' if before.get('invariant') else 'not said invariant by the CPU'}, "
                     f"{record['tsc_hz'] / 1e6:.3f} MHz)")
        return {"marks": marks, "clock": clock, "clock_offset_s": offset}

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
