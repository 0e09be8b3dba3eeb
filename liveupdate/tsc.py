"""The one clock that crosses a kexec: the CPU's time-stamp counter.

A live update's blackout spans two kernels, and CLOCK_REALTIME does not
cross from one to the other faithfully: the new kernel sets it at boot from
the machine's clock -- a CMOS RTC has whole seconds -- and the old one's may
have drifted from it (in the lab's TCG guest the two differ by seconds).
CLOCK_MONOTONIC starts again at zero.  The TSC does neither: a kexec is no
reset, so on a CPU with an invariant TSC (``constant_tsc``, ``nonstop_tsc``)
it counts on through the jump at a constant rate.

So the agent takes a (TSC, CLOCK_REALTIME) pair at the reboot call, with
the TSC's rate measured against CLOCK_MONOTONIC_RAW over its own life
(:class:`Rate`), and the new kernel's side takes another
(:func:`clock_offset`): the TSC says how long really went by, and the
difference with what the realtime clocks say is the new kernel's clock
error -- what each mark taken after the kexec is corrected by.

RDTSC has no system call: it is executed from a page of code this process
maps executable (x86-64 only; elsewhere :func:`read` returns None and
nothing is corrected).  Whether the CPU calls its TSC invariant goes with
each mark: a report says which clock it trusted.
"""

from __future__ import annotations

import mmap
import os
import time

#: rdtsc; shl rdx, 32; or rax, rdx; ret
_CODE = bytes.fromhex("0f3148c1e2204809d0c3")
_rdtsc = None
_page = None


def _flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split()
    except OSError:
        pass
    return []


def invariant() -> bool:
    """Whether the CPU says its TSC runs at a constant rate, through idle
    states too (a virtual CPU may not say so of a TSC that does: QEMU's TCG
    CPUs count their TSC on the host's clock whatever they advertise)."""
    flags = _flags()
    return "constant_tsc" in flags and "nonstop_tsc" in flags


def read() -> int | None:
    """The TSC, or None where there is none to read (not x86-64, no ``tsc`` flag)."""
    global _rdtsc, _page
    if _rdtsc is None:
        if os.uname().machine != "x86_64" or "tsc" not in _flags():
            _rdtsc = False
        else:
            from luvmm.abi import ffi

            _page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
            _page.write(_CODE)
            _rdtsc = ffi.cast("uint64_t (*)(void)", ffi.from_buffer(_page))
    return int(_rdtsc()) if _rdtsc else None


class Rate:
    """The TSC's rate, measured against CLOCK_MONOTONIC_RAW from when this
    was made to when :meth:`hz` is asked (the longer, the better: the agent
    makes one when it starts, and asks at the reboot call)."""

    def __init__(self):
        self.tsc, self.mono = read(), time.clock_gettime(time.CLOCK_MONOTONIC_RAW)

    def hz(self) -> float | None:
        now, mono = read(), time.clock_gettime(time.CLOCK_MONOTONIC_RAW)
        if self.tsc is None or now is None or mono - self.mono < 0.05:
            return None
        return (now - self.tsc) / (mono - self.mono)


def hz(window: float = 0.1) -> float | None:
    """The TSC's rate, measured now over ``window`` seconds (for a VM's cold
    boot, whose firmware stamps from the TSC: never on the restore path)."""
    rate = Rate()
    time.sleep(window)  # the measurement's window, not a wait for anything
    return rate.hz()


def mark() -> dict:
    """A (TSC, CLOCK_REALTIME) pair, taken together."""
    return {"tsc": read(), "realtime": time.time(), "invariant": invariant()}


def clock_offset(before: dict, hz: float | None) -> float | None:
    """How far this kernel's CLOCK_REALTIME is from the one ``before`` (a
    :func:`mark` of the old kernel) was read on, in seconds -- add it to a
    mark taken here to put it on the old kernel's timeline.  None when the
    TSC cannot say (not read, no rate, or it went backwards: not the same
    counter, e.g. a machine reset)."""
    now = mark()
    if not hz or before.get("tsc") is None or now["tsc"] is None or now["tsc"] < before["tsc"]:
        return None
    elapsed = (now["tsc"] - before["tsc"]) / hz
    return (before["realtime"] + elapsed) - now["realtime"]
