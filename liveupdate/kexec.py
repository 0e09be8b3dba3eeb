"""Loading the next kernel: kexec_file_load(2) through cffi.

    from luvmm.liveupdate.kexec import load_kernel
    load_kernel("/boot/vmlinuz-7.2.13", initrd="/boot/initrd.img-7.2.13", reuse_cmdline=True)
    host.kexec()                              # reboot(LINUX_REBOOT_CMD_KEXEC) into it

The kernel verifies and copies the image at load time (kernel/kexec_file.c
kimage_file_alloc_init), so every reason a kernel cannot be booted -- a
missing file, not a kernel, a signature refused, not permitted -- shows here,
before any VM is paused; the reboot itself then only jumps.  What
``kexec -s -l IMAGE [--initrd F] [--append A | --reuse-cmdline]`` does, with
the kernel's errno on failure.
"""

from __future__ import annotations

import errno
import os

from luvmm.abi import ffi, libc
from luvmm.uapi.kexec import KEXEC_FILE_NO_INITRAMFS, KEXEC_FILE_UNLOAD, __NR_kexec_file_load

#: Why kexec_file_load refused, by errno (kernel/kexec_file.c and the
#: image loaders it calls), in words an operator can act on.
WHY = {
    errno.EPERM: "not permitted (needs CAP_SYS_BOOT; kernel.kexec_load_disabled may be set)",
    errno.ENOEXEC: "not a kernel image this kernel can load (kexec_file_load: no image loader took it)",
    errno.EKEYREJECTED: "its signature was refused (the kernel enforces signed kexec images)",
    errno.EBUSY: "another kexec load is under way",
    errno.ENOSYS: "this kernel has no kexec_file_load (CONFIG_KEXEC_FILE)",
    errno.EINVAL: "refused as invalid (command line not terminated, or bad flags)",
    errno.ENOMEM: "not enough memory to hold the image",
    errno.EFBIG: "the image is too large",
    errno.ETXTBSY: "the file is open for writing (kernel_read_file: deny_write_access)",
}


class KexecError(OSError):
    """kexec_file_load failed: ``errno`` is the kernel's, the message says why."""


def reused_cmdline(path: str = "/proc/cmdline") -> str:
    """This boot's command line without ``BOOT_IMAGE=`` (kexec-tools'
    --reuse-cmdline does the same: the next kernel is another image)."""
    with open(path) as f:
        words = f.read().strip().split()
    return " ".join(w for w in words if not w.startswith("BOOT_IMAGE="))


def _open(path: str, what: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise KexecError(e.errno, f"{what} {path}: {e.strerror}") from None


def load_kernel(image: str, *, initrd: str | None = None, cmdline: str | None = None,
                reuse_cmdline: bool = False) -> str:
    """kexec_file_load ``image`` (with ``initrd``) and a command line:
    ``cmdline``, or this boot's (``reuse_cmdline``), or none.  Replaces a
    kernel loaded before.  Returns the command line given."""
    if cmdline is not None and reuse_cmdline:
        raise ValueError("either a command line or reuse_cmdline, not both")
    if reuse_cmdline:
        cmdline = reused_cmdline()
    cmdline = cmdline or ""
    kernel_fd = _open(image, "kernel image")
    initrd_fd = -1
    try:
        if initrd:
            initrd_fd = _open(initrd, "initrd")
        raw = cmdline.encode() + b"\0"  # cmdline_len counts the NUL, which the kernel checks is there
        buf = ffi.new("char[]", raw)
        flags = 0 if initrd else KEXEC_FILE_NO_INITRAMFS
        _syscall(kernel_fd, initrd_fd, len(raw), buf, flags, f"cannot load {image}")
    finally:
        os.close(kernel_fd)
        if initrd_fd >= 0:
            os.close(initrd_fd)
    return cmdline


def unload_kernel() -> None:
    """KEXEC_FILE_UNLOAD: forget the kernel loaded (nothing to boot at reboot(KEXEC))."""
    _syscall(-1, -1, 0, ffi.NULL, KEXEC_FILE_UNLOAD, "cannot unload the kexec kernel")


def kernel_loaded(path: str = "/sys/kernel/kexec_loaded") -> bool:
    """Whether a kernel is loaded for reboot(LINUX_REBOOT_CMD_KEXEC)."""
    try:
        with open(path) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def probe_kexec_file_load() -> str:
    """Whether this kernel would load an image, without loading or unloading
    anything: kexec_file_load with no kernel fd.  kernel/kexec_file.c checks
    permission first (EPERM: CAP_SYS_BOOT, kexec_load_disabled), then the lock
    (EBUSY), then the fd: EBADF means the call is there and permitted;
    ENOSYS without CONFIG_KEXEC_FILE.  The errno's name."""
    try:
        _syscall(-1, -1, 0, ffi.NULL, 0, "probe")
    except KexecError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "0"


def _syscall(kernel_fd: int, initrd_fd: int, cmdline_len: int, cmdline, flags: int, what: str) -> None:
    rc = libc.syscall(__NR_kexec_file_load, ffi.cast("int", kernel_fd), ffi.cast("int", initrd_fd),
                      ffi.cast("unsigned long", cmdline_len), cmdline, ffi.cast("unsigned long", flags))
    if rc != 0:
        code = ffi.errno
        raise KexecError(code, f"{what}: {WHY.get(code, os.strerror(code))}")
