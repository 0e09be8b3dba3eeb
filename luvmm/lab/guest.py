"""Inside the lab guest: the stage runner, and the helpers a staged test uses.

virtme-ng's init runs ``python -m luvmm.lab.guest SHARED`` as the guest's
command at every boot -- the first one, and each one a kexec starts, because
``kexec --reuse-cmdline`` hands the same command line to the next kernel.  The
runner:

1. counts the boots recorded in SHARED/boots.jsonl: this boot is stage N+1;
2. binds the lab's devices (QEMU's edu, 1234:11e8) to vfio-pci through
   ``driver_override``, so /dev/vfio/devices/vfioN exist;
3. records the boot and runs the user's command (SHARED/lab-run.json) with
   ``LUVMM_LAB_STAGE``, ``LUVMM_LAB_SHARED``, ``LUVMM_LAB_DEVICES`` (BDFs),
   ``LUVMM_LAB_KERNEL`` (the image a kexec boots) and ``LUVMM_LAB_SELFTESTS``
   in its environment;
4. records its exit status and the kernel log, and exits with that status
   (virtme-ng then powers the guest off and hands the status to the host).

A command moves to the next stage by kexec: :func:`kexec` here (or
``luvmm lab kexec`` from a shell) loads the lab kernel with
kexec_file_load (:mod:`luvmm.liveupdate.kexec`, as ``kexec -s -l IMAGE --reuse-cmdline``) and reboots into it with
``reboot(LINUX_REBOOT_CMD_KEXEC)``; whatever process holds LUO sessions must
still be alive then (the caller itself, or a daemon it left, as the upstream
selftests do).
"""

from __future__ import annotations

import json
import os
import sys

EDU = ("0x1234", "0x11e8")  # QEMU's edu: vendor, device
PCI = "/sys/bus/pci/devices"
RUN_FILE = "lab-run.json"
BOOTS_FILE = "boots.jsonl"
EXITS_FILE = "exits.jsonl"
KEXEC_FILE = "kexec.jsonl"


class NotInLab(RuntimeError):
    pass


def _uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def _append(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _records(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError:
        return []


# --- for the command running in the guest ----------------------------------------------------------

def shared_dir() -> str:
    path = os.environ.get("LUVMM_LAB_SHARED")
    if not path:
        raise NotInLab("not in a lab guest (LUVMM_LAB_SHARED is not set): run it with `luvmm lab run -- CMD`")
    return path


def stage() -> int:
    """This boot's stage: 1 for the first boot, 2 after the first kexec, ..."""
    shared_dir()
    return int(os.environ["LUVMM_LAB_STAGE"])


def devices() -> list[str]:
    """The BDFs of the lab's passthrough devices, bound to vfio-pci."""
    shared_dir()
    return [d for d in os.environ.get("LUVMM_LAB_DEVICES", "").split(",") if d]


def path(name: str) -> str:
    """A file in the shared directory (the host reads it after the run)."""
    return os.path.join(shared_dir(), name)


def save(name: str, obj) -> None:
    """Write ``obj`` as JSON to the shared directory, durably (a kexec may follow)."""
    target = path(name)
    tmp = f"{target}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def load(name: str, default=None):
    try:
        with open(path(name)) as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def load_kernel(image: str | None = None) -> str:
    """kexec_file_load the next lab kernel with this boot's command line
    (luvmm.liveupdate.kexec: the product's own loader, exercised by every lab kexec)."""
    from luvmm.liveupdate.kexec import load_kernel as load

    image = image or os.environ.get("LUVMM_LAB_KERNEL")
    if not image:
        raise NotInLab("no kernel to kexec (LUVMM_LAB_KERNEL is not set)")
    load(image, reuse_cmdline=True)
    return image


def kexec(image: str | None = None) -> None:
    """Load the next lab kernel and reboot into it: LUO freezes and hands over,
    the command runs again as the next stage.  Does not return on success."""
    from luvmm.host import RealHost

    shared_dir()
    asked = _uptime()
    image = load_kernel(image)
    _append(path(KEXEC_FILE), {"stage": stage(), "image": image, "uptime": asked, "loaded": _uptime()})
    sys.stdout.flush()
    sys.stderr.flush()
    os.sync()
    RealHost().kexec()
    raise OSError("reboot(LINUX_REBOOT_CMD_KEXEC) returned")


# --- the runner ---------------------------------------------------------------------------------------

def _read(p: str) -> str:
    with open(p) as f:
        return f.read().strip()


def bind_edu_devices() -> list[str]:
    """Bind every edu function to vfio-pci (driver_override); return their BDFs."""
    bound = []
    for bdf in sorted(os.listdir(PCI)):
        dev = os.path.join(PCI, bdf)
        if (_read(os.path.join(dev, "vendor")), _read(os.path.join(dev, "device"))) != EDU:
            continue
        with open(os.path.join(dev, "driver_override"), "w") as f:
            f.write("vfio-pci")
        driver = os.path.join(dev, "driver")
        if os.path.exists(driver):
            if os.path.basename(os.path.realpath(driver)) != "vfio-pci":
                with open(os.path.join(driver, "unbind"), "w") as f:
                    f.write(bdf)
        if not os.path.exists(driver):
            with open("/sys/bus/pci/drivers_probe", "w") as f:
                f.write(bdf)
        if not os.path.isdir(os.path.join(dev, "vfio-dev")):
            raise OSError(f"{bdf} did not bind to vfio-pci (no {dev}/vfio-dev)")
        bound.append(bdf)
    return bound


def _virtio_ports() -> dict[str, str]:
    """virtio-serial port name -> device node (/dev/vportNpM, made by devtmpfs)."""
    ports = {}
    root = "/sys/class/virtio-ports"
    for entry in os.listdir(root) if os.path.isdir(root) else []:
        try:
            ports[_read(os.path.join(root, entry, "name"))] = os.path.join("/dev", entry)
        except OSError:
            continue
    return ports


def _attach_script_ports() -> str | None:
    """virtme-ng's init connects the command to its virtio-serial ports through
    /dev/virtio-ports/NAME, links that only udev makes; where the host has no
    udevd it falls back to the console and the host gets neither the output
    nor the exit status.  Connect them here instead; returns the port for the
    exit status when this runner must write it (None: virtme-ng's init will)."""
    if os.path.exists("/dev/virtio-ports/virtme.stdout"):
        return None
    ports = _virtio_ports()
    for name, fd in (("virtme.stdout", 1), ("virtme.stderr", 2)):
        if name in ports:
            port = os.open(ports[name], os.O_WRONLY | os.O_NOCTTY)
            os.dup2(port, fd)
            os.close(port)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return ports.get("virtme.ret")


def _kernel_log() -> str:
    """The kernel's log buffer as dmesg prints it (from /dev/kmsg, without
    starting a process: the runner is on every stage's critical path)."""
    lines = []
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        while True:
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except BrokenPipeError:  # overwritten while reading: go on with the next
                continue
            prefix, _, text = record.partition(";")
            fields = prefix.split(",")
            usec = int(fields[2]) if len(fields) > 2 and fields[2].isdigit() else 0
            lines.append(f"[{usec // 1000000:5d}.{usec % 1000000:06d}] {text.splitlines()[0] if text else ''}")
    finally:
        os.close(fd)
    return "\n".join(lines) + "\n"


def _run(cmd, cwd: str, env: dict) -> int:
    """Run the command (a list, or a string for /bin/sh -c) and wait; its
    status, or -signal (os.fork and exec: no subprocess import on this path)."""
    argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir(cwd)
            os.execvpe(argv[0], argv, env)
        except OSError as e:
            os.write(2, f"luvmm lab: cannot run {argv[0]!r}: {e.strerror}\n".encode())
        os._exit(127)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m luvmm.lab.guest SHARED_DIR (run by `luvmm lab run` in the guest)", file=sys.stderr)
        return 2
    shared = argv[0]
    started = _uptime()
    ret_port = _attach_script_ports()
    config = json.load(open(os.path.join(shared, RUN_FILE)))
    n = len(_records(os.path.join(shared, BOOTS_FILE))) + 1
    error = None
    try:
        bdfs = bind_edu_devices()
    except OSError as e:
        bdfs, error = [], str(e)
    _append(os.path.join(shared, BOOTS_FILE), {
        "stage": n, "release": os.uname().release, "uptime": started, "devices": bdfs,
        "bind_error": error, "cmdline": _read("/proc/cmdline")[:256]})
    if error:
        print(f"luvmm lab: {error}", file=sys.stderr)
        if ret_port:
            with open(ret_port, "w") as f:
                f.write("125\n")
        return 125
    env = dict(os.environ)
    env.update(config.get("env", {}))
    env.update({
        "LUVMM_LAB_STAGE": str(n), "LUVMM_LAB_SHARED": shared, "LUVMM_LAB_DEVICES": ",".join(bdfs),
        "LUVMM_LAB_KERNEL": config["kexec_image"], "LUVMM_LAB_SELFTESTS": config.get("selftests", ""),
        "PYTHONPATH": os.pathsep.join(p for p in (config["root"], env.get("PYTHONPATH", "")) if p),
        "PATH": os.pathsep.join((os.path.dirname(config["python"]), env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                                 "/usr/sbin", "/sbin")),
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    rc = _run(config["cmd"], config.get("cwd") or "/", env)
    with open(os.path.join(shared, f"dmesg-{n}.txt"), "w") as f:
        f.write(_kernel_log())
    status = rc if rc >= 0 else 128 - rc  # killed by signal -rc: the shell's 128+N
    _append(os.path.join(shared, EXITS_FILE), {"stage": n, "exit": status, "uptime": _uptime()})
    sys.stdout.flush()
    sys.stderr.flush()
    if ret_port:
        with open(ret_port, "w") as f:
            f.write(f"{status}\n")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
