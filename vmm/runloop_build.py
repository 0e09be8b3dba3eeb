"""Builds ``vmm._runloop``, the vCPU run loop in C (vmm/runloop.c), with
cffi's API mode: at install time (setup.py's ``cffi_modules``), or in place
by :func:`build` when the module is missing or older than its sources (a
checkout edited since it was installed).  The declarations are runloop.h's,
between its CDEF markers, so the C compiler and cffi read the same text."""

from __future__ import annotations

import os
import re

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))


def _cdef() -> str:
    with open(os.path.join(HERE, "runloop.h")) as f:
        text = f.read()
    body = text.split("/* CDEF-BEGIN */", 1)[1].split("/* CDEF-END */", 1)[0]
    # Array sizes by their #define (cffi's parser has no preprocessor).
    defines = dict(re.findall(r"#define\s+(\w+)\s+(\w+)", body))
    return re.sub(r"\[(\w+)\]", lambda m: f"[{defines.get(m.group(1), m.group(1))}]", body)


def ffibuilder() -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(_cdef())
    with open(os.path.join(HERE, "runloop.c")) as f:
        source = f.read()
    ffi.set_source("luvmm.vmm._runloop", source,
                   include_dirs=[HERE], extra_compile_args=["-O2", "-Wall"])
    return ffi


def build() -> None:
    """Compile ``luvmm.vmm._runloop`` in place (beside this file)."""
    import contextlib
    import io
    import tempfile

    import glob

    with tempfile.TemporaryDirectory(prefix="luvmm-runloop-") as tmp, \
            contextlib.redirect_stdout(io.StringIO()):
        built = ffibuilder().compile(tmpdir=tmp, verbose=False)
        target = os.path.join(HERE, os.path.basename(built))
        os.replace(built, target)
    for other in glob.glob(os.path.join(HERE, "_runloop.*.so")):  # an install's build, now stale
        if other != target:
            os.unlink(other)
