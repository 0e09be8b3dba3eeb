"""Runs inside the lab guest: the upstream kernel's own LUO selftests
(tools/testing/selftests/liveupdate, built by ``luvmm lab build`` from the
lab kernel's tree) with their stage protocol.

Stage 1: ``liveupdate`` (no kexec needed), then stage 1 of each kexec test --
each leaves a daemon holding its sessions, as upstream's do -- then a kexec.
Stage 2: stage 2 of each kexec test.  Every program's exit status and output
go to ``selftests-N.json`` in the shared directory.

    python -m tests.lab.guest_selftests
"""

from __future__ import annotations

import os
import subprocess

from luvmm.lab import guest
from luvmm.lab.build import KEXEC_SELFTESTS


def run(program: str, *args: str) -> dict:
    directory = os.environ["LUVMM_LAB_SELFTESTS"]
    try:
        p = subprocess.run([os.path.join(directory, program), *args], cwd=directory, capture_output=True,
                           text=True, timeout=300, stdin=subprocess.DEVNULL)
        return {"exit": p.returncode, "output": p.stdout + p.stderr}
    except subprocess.TimeoutExpired as e:
        return {"exit": None, "output": f"timed out: {e}"}


def main() -> int:
    n = guest.stage()
    results = {"release": os.uname().release}
    if n == 1:
        results["liveupdate"] = run("liveupdate")
        for name in KEXEC_SELFTESTS:
            results[name] = run(name, "--stage", "1")
        guest.save("selftests-1.json", results)
        guest.kexec()
        return 1
    for name in KEXEC_SELFTESTS:
        results[name] = run(name, "--stage", "2")
    guest.save("selftests-2.json", results)
    return 0 if all(r["exit"] == 0 for r in results.values() if isinstance(r, dict)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
