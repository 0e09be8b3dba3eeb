"""Runs inside the lab guest (the lab_devices boot): luvmm.liveupdate.kexec against the
real kexec_file_load -- the lab kernel loads (and is loaded), a missing
image, a file that is not a kernel, unload.  Records ``kexec_load.json``;
tests/lab/test_lab_kexec_load.py asserts.  Every lab kexec loads its next
kernel through luvmm.liveupdate.kexec too (luvmm.lab.guest.load_kernel).

    python -m tests.lab.guest_kexec_load
"""

from __future__ import annotations

import os
import tempfile

from luvmm.liveupdate import kexec
from luvmm.lab import guest


def _errno(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except OSError as e:
        return {"errno": e.errno, "message": e.strerror}
    return 0


def main() -> int:
    image = os.environ["LUVMM_LAB_KERNEL"]
    out = {"loaded_before": kexec.kernel_loaded()}
    out["load"] = _errno(kexec.load_kernel, image, reuse_cmdline=True)
    out["loaded_after_load"] = kexec.kernel_loaded()
    out["unload"] = _errno(kexec.unload_kernel)
    out["loaded_after_unload"] = kexec.kernel_loaded()
    out["missing"] = _errno(kexec.load_kernel, "/nonexistent/vmlinuz")
    with tempfile.TemporaryDirectory() as tmp:
        junk = os.path.join(tmp, "junk.img")
        with open(junk, "wb") as f:
            f.write(b"not a kernel\n" * 1000)
        out["not_a_kernel"] = _errno(kexec.load_kernel, junk)
        with open(junk, "ab") as writer:  # kernel_read_file: no image that someone is writing
            out["open_for_writing"] = _errno(kexec.load_kernel, junk)
            writer.write(b"")
    out["loaded_at_end"] = kexec.kernel_loaded()
    out["cmdline"] = kexec.reused_cmdline()
    guest.save("kexec_load.json", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
