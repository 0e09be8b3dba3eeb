"""Runs inside the lab guest: the emulated kernel's LUO rules, checked against
the real one.  tests/emulated/test_luo_selftests.py (the Python ports of the upstream
selftests and the other LUO rules of docs/emulated-host.md, "The rules of the
real kernel") runs against the emulated host; here its tests that need no kexec run unchanged against the lab
kernel, through ``RealHost``.  (The kexec ones are what
guest_memfd.py and the upstream selftests do across a real kexec.)  Each
test's new fds are closed after it, as the emulated host's teardown does.
Records ``luo_rules.json``: {test: "passed" | "skipped: ..." | "failed: ..."}.

    python -m tests.lab.guest_luo_rules
"""

from __future__ import annotations

import inspect
import os
import traceback
from types import SimpleNamespace

import pytest

from luvmm.host import RealHost
from luvmm.lab import guest
from tests.emulated import test_luo_selftests as ports


def _fds() -> set[int]:
    """This process's open fds: those listed that are still open once the
    listing (whose own fd is among them) is done."""
    open_now = set()
    for fd in (int(name) for name in os.listdir("/proc/self/fd")):
        try:
            os.fstat(fd)
        except OSError:
            continue
        open_now.add(fd)
    return open_now


def without_kexec() -> list[str]:
    names = []
    for name, fn in vars(ports).items():
        if name.startswith("test_") and callable(fn) and "kexec()" not in inspect.getsource(fn):
            names.append(name)
    return sorted(names)


def main() -> int:
    results = {}
    fixture = SimpleNamespace(host=RealHost(), profile="real")
    for name in without_kexec():
        before = _fds()
        try:
            getattr(ports, name)(fixture)
            results[name] = "passed"
        except pytest.skip.Exception as e:
            results[name] = f"skipped: {e}"
        except BaseException as e:  # noqa: BLE001 - an assertion or the kernel's refusal, recorded
            results[name] = f"failed: {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
        for fd in _fds() - before:
            try:
                os.close(fd)
            except OSError:
                pass
    guest.save("luo_rules.json", results)
    return 0 if all(r == "passed" or r.startswith("skipped") for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
