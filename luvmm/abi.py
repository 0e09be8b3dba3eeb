"""Kernel ABI machinery shared by every uAPI module.

One cffi FFI instance (ABI mode, no compiler needed) holds the cdefs of every
kernel struct the project uses; each module of :mod:`luvmm.uapi` (one per
kernel header: kvm, vfio, iommufd, luo, idxd) declares its structs with the
kernel's own names, so a layout question is always answered by
``ffi.sizeof("struct NAME")`` against the kernel headers.  This module is the
bottom layer: it imports none of them (they import it).

ioctl numbers are computed by the ``_IOC`` family exactly as
``include/uapi/asm-generic/ioctl.h`` does (x86, arm64, riscv and s390 use the
generic encoding); no number is ever pasted.  Every ioctl is registered in one
table (:data:`IOCTLS`) with the argument it takes, which lets the host
interface refuse a wrong buffer *before* the syscall and lets the emulated
host decode a request the way the kernel does.
"""

from __future__ import annotations

import os
import zlib

# The libc entry points the host interface needs.  ioctl goes through cffi
# rather than fcntl.ioctl: cffi releases the GIL and does *not* retry on EINTR,
# which is what lets another thread kick a vCPU out of KVM_RUN (PEP 475 makes
# fcntl.ioctl retry forever).
LIBC_CDEF = """
    int ioctl(int fd, unsigned long request, ...);
    int reboot(int cmd);
    long syscall(long number, ...);
    int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4, unsigned long arg5);
    int getppid(void);
    int madvise(void *addr, size_t length, int advice);
"""

#: The modules that declare uAPI structs (each owns its cdefs).
UAPI_MODULES = ("luvmm.uapi.kvm", "luvmm.uapi.vfio", "luvmm.uapi.iommufd", "luvmm.uapi.idxd",
                "luvmm.uapi.luo")  # luvmm.uapi.load_all() imports them
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_uapi_ffi.py")


def _sources_hash() -> str:
    """Identifies the cdef sources (zlib, not hashlib: this runs on the restore path)."""
    crc = zlib.crc32(LIBC_CDEF.encode())
    for module in UAPI_MODULES:
        with open(os.path.join(_ROOT, *module.split(".")) + ".py", "rb") as f:
            crc = zlib.crc32(f.read(), crc)
    return f"{crc:08x}"


def _load_prebuilt():
    """cffi's out-of-line ABI mode: the same cdefs, parsed once and saved as a
    module (luvmm/_uapi_ffi.py), so that a process on the restore path does
    not spend tens of milliseconds in pycparser.  Used only while the cdef
    sources are unchanged; otherwise the cdefs are parsed in line."""
    try:
        from luvmm import _uapi_ffi
    except ImportError:
        return None
    try:
        if _uapi_ffi.SOURCES_HASH != _sources_hash():
            return None
    except (AttributeError, OSError):
        return None
    return _uapi_ffi.ffi


ffi = _load_prebuilt()
PREBUILT = ffi is not None
_CDEFS: list[tuple[str, bool]] = []
if ffi is None:
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(LIBC_CDEF)
libc = ffi.dlopen(None)


def cdef(text: str, *, packed: bool = False) -> None:
    """Declare kernel structs (the owning module's cdef)."""
    _CDEFS.append((text, packed))
    if not PREBUILT:
        ffi.cdef(text, packed=packed)


# --- include/uapi/asm-generic/ioctl.h --------------------------------------
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2

_IOC_NRMASK = (1 << _IOC_NRBITS) - 1
_IOC_TYPEMASK = (1 << _IOC_TYPEBITS) - 1
_IOC_SIZEMASK = (1 << _IOC_SIZEBITS) - 1
_IOC_DIRMASK = (1 << _IOC_DIRBITS) - 1

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


class IoctlNumber(int):
    """An ioctl request number that remembers the argument type of its macro.

    ``_IOR(KVMIO, 0x81, "struct kvm_regs")`` is the int the kernel computes and
    also knows that its argument is a ``struct kvm_regs``.
    """

    argtype: str | None

    def __new__(cls, value: int, argtype: str | None = None) -> IoctlNumber:
        self = super().__new__(cls, value)
        self.argtype = argtype
        return self


def _ioc_type(t: int | str) -> int:
    # The kernel writes types as character literals: VFIO_TYPE is (';').
    return ord(t) if isinstance(t, str) else t


def _IOC(dir: int, type: int | str, nr: int, size: int) -> int:
    type = _ioc_type(type)
    if not (0 <= dir <= _IOC_DIRMASK and 0 <= type <= _IOC_TYPEMASK and 0 <= nr <= _IOC_NRMASK
            and 0 <= size <= _IOC_SIZEMASK):
        raise ValueError(f"ioctl field out of range: dir={dir} type={type} nr={nr} size={size}")
    return (dir << _IOC_DIRSHIFT) | (type << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _IOC_TYPECHECK(t: str) -> int:
    return ffi.sizeof(t)


def _IO(type: int | str, nr: int) -> IoctlNumber:
    return IoctlNumber(_IOC(_IOC_NONE, type, nr, 0))


def _IOR(type: int | str, nr: int, argtype: str) -> IoctlNumber:
    return IoctlNumber(_IOC(_IOC_READ, type, nr, _IOC_TYPECHECK(argtype)), argtype)


def _IOW(type: int | str, nr: int, argtype: str) -> IoctlNumber:
    return IoctlNumber(_IOC(_IOC_WRITE, type, nr, _IOC_TYPECHECK(argtype)), argtype)


def _IOWR(type: int | str, nr: int, argtype: str) -> IoctlNumber:
    return IoctlNumber(_IOC(_IOC_READ | _IOC_WRITE, type, nr, _IOC_TYPECHECK(argtype)), argtype)


def _IOC_DIR(nr: int) -> int:
    return (nr >> _IOC_DIRSHIFT) & _IOC_DIRMASK


def _IOC_TYPE(nr: int) -> int:
    return (nr >> _IOC_TYPESHIFT) & _IOC_TYPEMASK


def _IOC_NR(nr: int) -> int:
    return (nr >> _IOC_NRSHIFT) & _IOC_NRMASK


def _IOC_SIZE(nr: int) -> int:
    return (nr >> _IOC_SIZESHIFT) & _IOC_SIZEMASK


# --- the ioctl table ------------------------------------------------------------


class IoctlDef:
    """One ioctl as the kernel defines it.

    ``argtype`` is the C type the third argument points to, or ``None`` when
    the argument is a plain integer (KVM_CREATE_VCPU's vCPU id, KVM_RUN's 0).
    ``sized`` is true when the struct starts with a ``size``/``argsz`` field
    that tells the kernel how many bytes the caller supplied (the extensible
    struct convention of VFIO, iommufd and LUO).
    ``fd_fields`` names the struct fields that carry file descriptors into the
    kernel and ``out_fd_fields`` those that carry new ones back; the emulated
    host passes them with SCM_RIGHTS.
    ``user_out_buffers`` lists (pointer field, count field, element type) of
    user memory the kernel fills (IOMMU_IOAS_IOVA_RANGES' allowed_iovas): the
    emulated host returns those bytes after the struct and the client copies
    them to the pointer, as copy_to_user would.
    """

    __slots__ = ("name", "request", "argtype", "sized", "fd_fields", "out_fd_fields", "user_out_buffers")

    def __init__(self, name: str, request: int, argtype: str | None, sized: bool,
                 fd_fields: tuple[str, ...] = (), out_fd_fields: tuple[str, ...] = (),
                 user_out_buffers: tuple[tuple[str, str, str], ...] = ()):
        self.name, self.request, self.argtype, self.sized = name, request, argtype, sized
        self.fd_fields, self.out_fd_fields, self.user_out_buffers = fd_fields, out_fd_fields, user_out_buffers

    def __repr__(self) -> str:
        return f"IoctlDef({self.name}, {self.request:#x}, {self.argtype})"

    @property
    def argsize(self) -> int:
        return ffi.sizeof(self.argtype) if self.argtype else 0

    def offsetof(self, field: str) -> int:
        assert self.argtype is not None
        return ffi.offsetof(self.argtype, field)


IOCTLS: dict[int, IoctlDef] = {}
IOCTLS_BY_NAME: dict[str, IoctlDef] = {}
STRUCTS: dict[str, str] = {}  # "struct NAME" -> owning module, for `luvmm uapi`


def ioctl(name: str, request: IoctlNumber, argtype: str | None = None, *,
          fd_fields: tuple[str, ...] = (), out_fd_fields: tuple[str, ...] = (),
          user_out_buffers: tuple[tuple[str, str, str], ...] = ()) -> IoctlNumber:
    """Register an ioctl and return its number.

    For ``_IOR/_IOW/_IOWR`` the argument type comes from the macro; ``_IO``
    ioctls that nonetheless take a struct (VFIO, iommufd, LUO) name it here.
    """
    argtype = argtype or request.argtype
    if request.argtype and argtype != request.argtype:
        raise ValueError(f"{name}: argument {argtype} does not match the macro's {request.argtype}")
    sized = False
    if argtype is not None:
        fields = ffi.typeof(argtype).fields
        sized = bool(fields) and fields[0][0] in ("size", "argsz")
    definition = IoctlDef(name, int(request), argtype, sized, fd_fields, out_fd_fields, user_out_buffers)
    if int(request) in IOCTLS and IOCTLS[int(request)].name != name:
        raise ValueError(f"{name} collides with {IOCTLS[int(request)].name} (0x{int(request):x})")
    IOCTLS[int(request)] = definition
    IOCTLS_BY_NAME[name] = definition
    return request


def structs(module: str, *names: str) -> None:
    """Declare the uAPI structs a module owns (listed by ``luvmm uapi``)."""
    for name in names:
        ffi.sizeof(name)  # fail at import if the cdef is missing
        STRUCTS[name] = module


def new_arg(argtype: str, **fields):
    """``ffi.new(argtype *)`` with ``size``/``argsz`` set to the struct's size
    (what a caller of the kernel's extensible-struct ioctls always does) and
    the given fields filled in."""
    arg = ffi.new(argtype + " *")
    first = ffi.typeof(argtype).fields[0][0]
    if first in ("size", "argsz"):
        setattr(arg, first, ffi.sizeof(argtype))
    for name, value in fields.items():
        setattr(arg, name, value)
    return arg
