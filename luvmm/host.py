"""The host interface: the one code path above the syscall line.

Everything luvmm does to the host kernel -- KVM, VFIO cdev, iommufd, LUO,
kexec -- goes through a :class:`Host`.  There are two implementations with the
same behaviour, errno for errno:

* :class:`RealHost` -- ``os.open``, ``ioctl(2)`` (through cffi), ``pread``,
  ``pwrite``, ``mmap`` on the running kernel's /dev/kvm, /dev/vfio/devices/vfioN,
  /dev/iommu and /dev/liveupdate.
* the emulated host client (arrives with the emulated host daemon), whose
  device files are socket ends served by ``luvmm host``.

Everything above it -- ioctl numbers, struct bytes, errnos -- is identical, so
a test written against a ``Host`` (like the kernel's selftests are written
against the syscalls) runs unchanged on both::

    from luvmm.host import RealHost
    from luvmm.abi import ffi, new_arg
    from luvmm.uapi.iommufd import IOMMU_IOAS_ALLOC

    host = RealHost()
    fd = host.open("/dev/iommu")                      # OSError(ENOENT) if absent
    arg = new_arg("struct iommu_ioas_alloc")          # size filled in
    host.ioctl(fd, IOMMU_IOAS_ALLOC, ffi.buffer(arg))  # OSError with the errno
    print(arg.out_ioas_id)
    host.close(fd)

Rules every implementation follows:

* ``ioctl(fd, request, arg)``: ``arg`` is an ``int`` for ioctls whose argument
  is a value (KVM_CREATE_VCPU, KVM_RUN) and a *writable buffer* (bytearray,
  memoryview, ``ffi.buffer(cdata)``) for ioctls that take a struct; the kernel's
  output is written back into it.  A buffer smaller than the struct the kernel
  reads for that request, or a ``size``/``argsz`` field larger than the buffer,
  raises :class:`IoctlArgumentError` *before* any syscall, naming the struct.
  Kernel failures raise ``OSError`` with the kernel's errno.
* Returned fds are O_CLOEXEC, as the kernel's are.
"""

from __future__ import annotations

import abc
import mmap as _mmap
import os
import struct

from luvmm.abi import IOCTLS, IoctlDef, _IOC_SIZE, ffi, libc

#: An ioctl argument: an int, or a writable buffer holding the struct.
IoctlArg = object

# include/uapi/linux/reboot.h
LINUX_REBOOT_CMD_KEXEC = 0x45584543


class IoctlArgumentError(ValueError):
    """The caller's ioctl argument cannot be what the kernel expects.

    Raised before any syscall: handing the kernel a short buffer would make it
    read or write past the caller's memory.
    """


def _is_buffer(obj: object) -> bool:
    try:
        memoryview(obj)
    except TypeError:
        return False
    return True


def ioctl_name(request: int) -> str:
    definition = IOCTLS.get(request)
    return definition.name if definition else f"ioctl 0x{request:x}"


def check_ioctl_arg(request: int, arg: IoctlArg) -> IoctlDef | None:
    """Validate ``arg`` for ``request``; return the request's definition.

    Unknown requests are allowed (a user's own test may use an ioctl luvmm
    does not model); for them only the size encoded in the number is checked.
    """
    definition = IOCTLS.get(request)
    if isinstance(arg, bool) or not (isinstance(arg, int) or _is_buffer(arg)):
        raise IoctlArgumentError(f"{ioctl_name(request)}: argument must be an int or a writable buffer, "
                                 f"not {type(arg).__name__}")
    if definition is None:
        need = _IOC_SIZE(request)
        if need and not isinstance(arg, int) and memoryview(arg).nbytes < need:
            raise IoctlArgumentError(f"{ioctl_name(request)} encodes a {need}-byte argument; "
                                     f"the buffer has {memoryview(arg).nbytes} bytes")
        return None
    if definition.argtype is None:
        if not isinstance(arg, int):
            raise IoctlArgumentError(f"{definition.name} takes an integer argument, not a buffer")
        return definition
    if isinstance(arg, int):
        raise IoctlArgumentError(f"{definition.name} takes a pointer to {definition.argtype} "
                                 f"({definition.argsize} bytes), not an integer")
    view = memoryview(arg)
    if view.readonly:
        raise IoctlArgumentError(f"{definition.name}: the {definition.argtype} buffer must be writable "
                                 "(the kernel writes its results into it)")
    have = view.nbytes
    if have < definition.argsize:
        raise IoctlArgumentError(f"{definition.name} needs {definition.argtype} "
                                 f"({definition.argsize} bytes); the buffer has {have} bytes")
    if definition.sized:
        (claimed,) = struct.unpack_from("=I", view.cast("B"), 0)
        if claimed > have:
            raise IoctlArgumentError(f"{definition.name}: the {definition.argtype} says "
                                     f"{ffi.typeof(definition.argtype).fields[0][0]}={claimed} "
                                     f"but the buffer has only {have} bytes")
    return definition


def ioctl_error(err: int, request: int) -> OSError:
    """An OSError carrying the kernel's errno, naming the ioctl."""
    return OSError(err, f"{os.strerror(err)} ({ioctl_name(request)})")


class Host(abc.ABC):
    """A host kernel, seen from userspace.  See the module docstring."""

    #: "real" or "emulated"
    kind: str

    def ioctl(self, fd: int, request: int, arg: IoctlArg = 0) -> int:
        """ioctl(2): returns the kernel's non-negative result, raises OSError."""
        definition = check_ioctl_arg(request, arg)
        return self._ioctl(fd, request, arg, definition)

    @abc.abstractmethod
    def _ioctl(self, fd: int, request: int, arg: IoctlArg, definition: IoctlDef | None) -> int:
        """The syscall itself, after the argument was checked."""

    @abc.abstractmethod
    def open(self, path: str, flags: int = os.O_RDWR) -> int:
        """open(2); the returned fd is always O_CLOEXEC."""

    @abc.abstractmethod
    def close(self, fd: int) -> None:
        """close(2)."""

    @abc.abstractmethod
    def pread(self, fd: int, length: int, offset: int) -> bytes:
        """pread(2): a device region access at ``offset`` (VFIO regions)."""

    @abc.abstractmethod
    def pwrite(self, fd: int, data: IoctlArg, offset: int) -> int:
        """pwrite(2): returns the number of bytes written."""

    @abc.abstractmethod
    def mmap(self, fd: int, length: int, offset: int = 0, *,
             prot: int = _mmap.PROT_READ | _mmap.PROT_WRITE, flags: int = _mmap.MAP_SHARED) -> _mmap.mmap:
        """mmap(2) of ``fd`` (memfds, the vCPU's kvm_run, mmap-able regions)."""

    def region_access(self, fd: int) -> tuple[str, int]:
        """How a device file's regions are reached by code that runs without
        this process's Python (the vCPU run loop in C): ``("syscall", 0)``,
        pread(2)/pwrite(2) at the region's offset, as on a real kernel; or
        ``("wire", op)``, an emulated file's socket, where a write may be
        posted as one message of request ``op`` (luvmm.wire) while a read
        needs the reply, which only this host object waits for."""
        return ("syscall", 0)

    @abc.abstractmethod
    def listdir(self, path: str) -> list[str]:
        """Directory entries (sysfs: /sys/bus/pci/devices/<BDF>/vfio-dev)."""

    @abc.abstractmethod
    def kexec(self):
        """reboot(LINUX_REBOOT_CMD_KEXEC): LUO freezes, the new kernel boots.

        On a real host this does not return on success.  The emulated host
        returns after the new kernel is up, with a dict describing the reboot
        (a caller started by the host's init has been killed by then).  A
        failing freeze raises OSError with its errno and nothing happens.
        """


class RealHost(Host):
    """The running kernel."""

    kind = "real"

    def _ioctl(self, fd: int, request: int, arg: IoctlArg, definition: IoctlDef | None) -> int:
        if isinstance(arg, int):
            ret = libc.ioctl(fd, request, ffi.cast("unsigned long", arg))
        else:
            ret = libc.ioctl(fd, request, ffi.cast("void *", ffi.from_buffer(arg, require_writable=True)))
        if ret < 0:
            raise ioctl_error(ffi.errno, request)
        return ret

    def open(self, path: str, flags: int = os.O_RDWR) -> int:
        return os.open(path, flags | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        return os.pread(fd, length, offset)

    def pwrite(self, fd: int, data: object, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def mmap(self, fd: int, length: int, offset: int = 0, *,
             prot: int = _mmap.PROT_READ | _mmap.PROT_WRITE, flags: int = _mmap.MAP_SHARED) -> _mmap.mmap:
        return _mmap.mmap(fd, length, flags=flags, prot=prot, offset=offset)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def kexec(self) -> None:
        # The new kernel must have been loaded first (kexec_file_load, e.g.
        # `kexec -s -l bzImage --reuse-cmdline`); without one this is EINVAL.
        if libc.reboot(LINUX_REBOOT_CMD_KEXEC) < 0:
            err = ffi.errno
            raise OSError(err, f"{os.strerror(err)} (reboot(LINUX_REBOOT_CMD_KEXEC))")


class KernelObject:
    """A typed handle on one kernel object reached through a file descriptor.

    The pattern of rust-vmm's kvm-ioctls: ``Kvm -> Vm -> Vcpu``,
    ``VfioDevice``, ``IommuFd``, ``LiveUpdate -> Session`` each own an fd and
    expose the ioctls of that object as methods; errors are OSErrors carrying
    the kernel's errno.
    """

    def __init__(self, host: Host, fd: int):
        self.host = host
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def ioctl(self, request: int, arg=0) -> int:
        """Issue ``request`` on this object; ``arg`` may be a cffi struct pointer."""
        if isinstance(arg, ffi.CData):
            arg = ffi.buffer(arg)
        return self.host.ioctl(self.fd, request, arg)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            self.host.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} fd={self.fd} on {self.host.kind} host>"
