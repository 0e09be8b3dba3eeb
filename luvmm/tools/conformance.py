"""`luvmm lab conformance`: the conformance cases (luvmm.lab.conformance)
on a fresh emulated host here and on the lab kernel under QEMU, compared."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile

from luvmm.lab import ROOT, LabError
from luvmm.devices.vfio import vfio_functions
from luvmm.lab import conformance


def run_emulated(areas) -> dict[str, dict]:
    """The cases on a fresh emulated host (one DSA, no agent), stopped afterwards."""
    from luvmm.liveupdate.emu import hostctl
    from luvmm.liveupdate.state import StateDir
    from luvmm.wiring import connect

    path = tempfile.mkdtemp(prefix="luvmm-conf-")  # short: Unix socket paths are limited
    state = StateDir(path)
    try:
        hostctl.start(state, agent=False)
        host, _ = connect("emulated", state.socket)
        try:
            return conformance.run(host, vfio_functions(host), "emulated", areas)
        finally:
            host.close_connection()
    finally:
        hostctl.stop(state)
        shutil.rmtree(path, ignore_errors=True)


def run_real(areas, manifest: dict, timeout: float) -> dict[str, dict]:
    """The cases in the lab guest, on the lab kernel (one edu bound to vfio-pci)."""
    from luvmm.lab.run import run

    shared = tempfile.mkdtemp(prefix="luvmm-conf-lab-")
    try:
        cmd = " ".join([shlex.quote(sys.executable), "-m", "luvmm.lab.conformance", *areas])
        result = run(cmd, manifest, results=shared, cwd=ROOT, timeout=timeout, tee=False)
        if result.timed_out:
            raise LabError(f"the lab guest timed out after {timeout:g} s")
        try:
            import json

            with open(os.path.join(shared, "conformance.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
            raise LabError("the lab guest saved no conformance results: " + " | ".join(tail)) from None
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def run_both(areas, manifest: dict, timeout: float) -> dict:
    emulated = run_emulated(areas)
    real = run_real(areas, manifest, timeout)
    rows = conformance.compare(emulated, real)
    return {"kernel": manifest.get("kernelrelease"), "areas": list(areas), "summary": conformance.summary(rows),
            "cases": rows, "out_of_tree": dict(conformance.OUT_OF_TREE),
            "cannot_model": dict(conformance.CANNOT_MODEL)}
