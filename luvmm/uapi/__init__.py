"""The kernel's uAPI, one module per header, with the kernel's names.

    kvm       include/uapi/linux/kvm.h (x86)
    vfio      include/uapi/linux/vfio.h (cdev, iommufd binding, PCI regions, IRQs)
    iommufd   include/uapi/linux/iommufd.h (+ the provisional HWPT-preserve ioctl)
    luo       include/uapi/linux/liveupdate.h
    idxd      include/uapi/linux/idxd.h (DSA descriptors, completion records)
    pci_regs  include/uapi/linux/pci_regs.h (config space)

Each registers its structs (cdefs) and ioctls with :mod:`luvmm.abi`, the
layer below, which imports none of them; ``table`` is what `luvmm uapi`
prints.  Importing a module costs no parsing on the restore path (the cdefs
come pre-parsed: ``luvmm/_uapi_ffi.py``).
"""

from __future__ import annotations

import os

from luvmm.abi import _CACHE, _CDEFS, LIBC_CDEF, UAPI_MODULES, _sources_hash


def load_all() -> None:
    """Import every uAPI module, so that the ioctl and struct tables are complete."""
    import importlib

    for module in UAPI_MODULES:
        importlib.import_module(module)


def build_cache() -> bool:
    """Write luvmm/_uapi_ffi.py, every module's cdefs parsed once (cffi's
    out-of-line ABI mode), so that a process on the restore path does not
    spend tens of milliseconds in pycparser.  Returns False where the
    package directory is not writable."""
    import contextlib
    import io

    import cffi

    load_all()
    fresh = cffi.FFI()
    fresh.cdef(LIBC_CDEF)
    for text, packed in _CDEFS:
        fresh.cdef(text, packed=packed)
    fresh.set_source("luvmm._uapi_ffi", None)
    tmp = os.path.join(os.path.dirname(_CACHE), f"._uapi_ffi.{os.getpid()}.tmp")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # cffi announces "generating ..."
            fresh.emit_python_code(tmp)
        with open(tmp, "a") as f:
            f.write(f"\nSOURCES_HASH = {_sources_hash()!r}\n")
        os.replace(tmp, _CACHE)
    except OSError:
        return False
    return True
