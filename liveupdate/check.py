"""`luvmm host check`: what the running kernel offers a live update, and what
each missing piece means for a VM.

Preservation is probed, not guessed: a throw-away LUO session is created and
a memfd, a VFIO cdev fd and an iommufd are each given to PRESERVE_FD --
ENOENT is luo_file.c's answer when no file handler takes the file
(luo_preserve_file) -- and the HWPT-preserve ioctl is tried on the iommufd
(ENOTTY: the kernel has no such ioctl).  Closing the session unpreserves
everything (luo_session_release), so the probe leaves the kernel as it was.
Where /dev/liveupdate is held (one opener: the agent, on a luvmm host), the
agent runs the same probe on its own LUO fd (its ``check`` request).  What
syscalls cannot show -- KHO, kexec_file_load, the IOMMUs, the device's
driver and IOMMU group -- comes from the host's MachineInfo service.
"""

from __future__ import annotations

import errno
import os

from luvmm.devices.iommufd import IommuFd
from luvmm.devices.vfio import VfioDevice, vfio_functions
from luvmm.liveupdate.luo import LiveUpdate

PROBE_SESSION = "luvmm-check"
RESET = ("the device will be reset at kexec: DMA stops, the work in flight is lost and the guest's driver "
         "re-initialises the device")


def _errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def probe_preservation(host, luo: LiveUpdate, device: str | None) -> dict:
    """PRESERVE_FD of a memfd, of ``device``'s VFIO cdev fd and of an iommufd
    in a throw-away session, and the HWPT-preserve ioctl: for each, "0" (taken),
    or the errno's name; None where it could not be tried (and why)."""
    result: dict = {}
    opened: list[int] = []
    try:
        session = luo.create_session(f"{PROBE_SESSION}-{os.getpid()}")
    except OSError as e:
        return {"error": f"LIVEUPDATE_IOCTL_CREATE_SESSION: {_errno_name(e.errno)}"}
    opened.append(session.fd)
    try:
        token = 1

        def preserve(fd: int) -> str:
            nonlocal token
            token += 1
            try:
                session.preserve_fd(fd, token)
            except OSError as e:
                return _errno_name(e.errno)
            return "0"

        memfd = os.memfd_create("luvmm-check", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(memfd, 4096)
            result["memfd"] = preserve(memfd)
        finally:
            os.close(memfd)
        if device:
            try:
                dev = VfioDevice.open_bdf(host, device)
            except OSError as e:
                result["vfio"] = None
                result["vfio_why"] = f"cannot open its VFIO cdev: {_errno_name(e.errno)}"
            else:
                opened.append(dev.fd)
                result["vfio"] = preserve(dev.fd)
        else:
            result["vfio"], result["vfio_why"] = None, "no PCI function bound to vfio-pci"
        try:
            iommufd = IommuFd.open(host)
        except OSError as e:
            result["iommufd"] = result["hwpt"] = None
            result["iommufd_why"] = f"cannot open /dev/iommu: {_errno_name(e.errno)}"
        else:
            opened.append(iommufd.fd)
            result["iommufd"] = preserve(iommufd.fd)
            try:
                iommufd.hwpt_liveupdate_mark_preserve(0, token + 1)  # no HWPT 0: a kernel with the ioctl says so
                result["hwpt"] = "0"
            except OSError as e:
                result["hwpt"] = _errno_name(e.errno)
    finally:
        for fd in reversed(opened):  # the session first to go last: closing it unpreserves the rest
            try:
                host.close(fd)
            except OSError:
                pass
    return result


def check(host, machine, device: str | None = None, ask_agent=None) -> dict:
    """Every finding: ``{name, present, detail, consequence}`` (present: True,
    False, or None: not known), and the verdicts ``vm_survives`` (RAM and
    machine state through LUO, the VM rebuilt after the kexec) and
    ``dma_continuity`` (the device and its DMA too).  ``ask_agent()`` runs
    :func:`probe_preservation` in the agent when /dev/liveupdate is held."""
    findings: list[dict] = []

    def add(name, present, detail, consequence=None):
        findings.append({"name": name, "present": present, "detail": detail,
                         "consequence": None if present else consequence})

    if device is None:
        functions = vfio_functions(host)
        device = functions[0] if functions else None
    luo_ok, probe, held = False, None, False
    try:
        luo = LiveUpdate.open(host)
    except OSError as e:
        if e.errno == errno.EBUSY:
            held, luo_ok = True, True
            add("liveupdate", True, "/dev/liveupdate is there, held by its one opener (on a luvmm host: the agent)")
            probe = ask_agent(device) if ask_agent else None
        elif e.errno == errno.EIO:
            add("liveupdate", False, "/dev/liveupdate refuses this boot (LUO could not take the incoming state)",
                "no live update until the next reboot: a kexec now loses every VM")
        else:
            add("liveupdate", False, f"no usable /dev/liveupdate ({_errno_name(e.errno)}): the kernel has no LUO "
                                     "(CONFIG_LIVEUPDATE, liveupdate=on)",
                "no live update: a kexec loses every VM (RAM, device and all)")
    else:
        luo_ok = True
        add("liveupdate", True, "/dev/liveupdate is there and free (one opener at a time)")
        try:
            probe = probe_preservation(host, luo, device)
        finally:
            luo.close()

    features = machine.features(device) if machine is not None else {}
    kho = features.get("kho")
    add("kho", kho, "KHO enabled" if kho else
        "KHO state unknown (debugfs not mounted, no kho= argument)" if kho is None else "KHO disabled (kho=off)",
        "LUO cannot hand anything to the next kernel: a kexec loses every VM")

    def preserved(key, label, consequence):
        if probe is None or "error" in probe:
            why = (probe or {}).get("error") or ("/dev/liveupdate is held and the agent did not answer" if held
                                                 else "no LUO")
            add(key, None if luo_ok else False, f"{label}: not probed ({why})", consequence)
            return None
        value = probe.get(key)
        if value is None:
            add(key, None, f"{label}: not probed ({probe.get(key + '_why', '')})", consequence)
            return None
        ok = value in ("0", "EBUSY")  # EBUSY: a handler took it already (a VM's session holds it)
        add(key, ok, f"{label}: " + ("preserved by LUO" if value == "0" else "held by a VM's session" if ok
                                     else f"refused ({value}: no LUO file handler takes it)"), consequence)
        return ok

    memfd = preserved("memfd", "memfd preservation (RAM, machine state)",
                      "the VM's RAM and machine state cannot cross the kexec: the VM is lost")
    vfio = preserved("vfio", "VFIO cdev preservation (the device)", RESET)
    iommufd = preserved("iommufd", "iommufd preservation (the IOMMU mappings)", RESET)
    if probe is not None and "error" not in probe and probe.get("hwpt") is not None:
        hw = probe["hwpt"]
        ok = hw != "ENOTTY"
        add("hwpt", ok, "HWPT preservation (IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE): " +
            ("the ioctl is there" if ok else "no such ioctl (ENOTTY)"),
            "the device's IOMMU domain is not kept: " + RESET)
        hwpt = ok
    else:
        add("hwpt", None, "HWPT preservation: not probed", "the device's IOMMU domain may not be kept: " + RESET)
        hwpt = None
    kexec = features.get("kexec_file_load")
    add("kexec_file_load", kexec == "EBADF" if kexec else None,
        {"EBADF": "kexec_file_load is there and permitted", "EPERM": "kexec_file_load is not permitted here (not "
         "root, or kernel.kexec_load_disabled)", "ENOSYS": "no kexec_file_load (CONFIG_KEXEC_FILE)",
         None: "kexec_file_load: unknown"}.get(kexec, f"kexec_file_load: {kexec}"),
        "no new kernel can be loaded: no live update")
    iommus = features.get("iommus")
    add("iommu", bool(iommus) if iommus is not None else None,
        f"IOMMU: {', '.join(iommus)}" if iommus else "no IOMMU (/sys/class/iommu is empty)",
        "no device can be passed through")
    if device:
        driver, group = features.get("driver"), features.get("iommu_group")
        add("device", driver == "vfio-pci" and group is not None,
            f"{device}: driver {driver or 'none'}, IOMMU group {group if group is not None else 'none'}",
            f"{device} cannot be passed through: bind it to vfio-pci (driver_override) behind an IOMMU")
    else:
        add("device", None, "no PCI function bound to vfio-pci (--device BDF names one)",
            "no device to pass through: the VM runs without one")
    profile = machine.kernel_profile() if machine is not None else None
    if profile == "reset-on-freeze":
        add("dma_continuity", False, "kernel profile reset-on-freeze: the device is reset at the freeze", RESET)

    by_name = {f["name"]: f["present"] for f in findings}
    vm_survives = bool(luo_ok and memfd is not False and by_name["kho"] is not False
                       and by_name["kexec_file_load"] is not False)
    dma = bool(vm_survives and vfio and iommufd and hwpt and by_name.get("device")
               and by_name.get("dma_continuity", True))
    return {"device": device, "findings": findings, "vm_survives": vm_survives, "dma_continuity": dma,
            "probe": probe}


def format_check(result: dict) -> str:
    lines = []
    for f in result["findings"]:
        mark = {True: "yes", False: "NO", None: "?"}[f["present"]]
        lines.append(f"{mark:3} {f['name']:16} {f['detail']}")
        if f["consequence"]:
            lines.append(f"{'':21}-> {f['consequence']}")
    if result["dma_continuity"]:
        lines.append("a live update keeps the VM, its device and its DMA")
    elif result["vm_survives"]:
        lines.append("a live update keeps the VM (RAM and machine state); its device is reset and re-initialised")
    else:
        lines.append("no live update is possible on this kernel: a kexec loses every VM")
    return "\n".join(lines)
