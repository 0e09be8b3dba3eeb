"""`luvmm bench shootdown`: what a TLB shootdown into its CPU costs a guest.

A VMM's vCPU threads run the VMM's address space: every change to it that
the kernel must flush from other CPUs' TLBs -- memory unmapped or made
read-only, a shared library's relocations -- interrupts the CPUs its vCPUs
run on (an IPI), and the guest pays the exit and the entry back.  How much
depends on the host: a few microseconds under VMX or SVM, tens under
KVM-PVM.  This benchmark measures it where it runs: on a fresh emulated
host, a firmware VM (its DSA at 64 MiB/s) whose VMM is this process, its
vCPU on a CPU of its own; the guest's heartbeat pace over windows in which
this process does nothing, and over windows in which it flips the
protection of a few of its own pages (each flip to read-only, one shootdown to the vCPU's CPU), the
shootdowns counted by the kernel (/proc/interrupts, TLB).  The guest time
lost over the shootdowns is the cost of one.  It is why the VMM's control
plane runs in a process of its own (luvmm.vmm.link).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import struct
import tempfile
import time

from luvmm.liveupdate.emu import hostctl
from luvmm.liveupdate.state import GUEST_CPUS_ENV, StateDir, parse_cpu_list
from luvmm.vmm import guest

PAGES = 16
PROT_READ, PROT_WRITE = 1, 2  # include/uapi/asm-generic/mman-common.h


def tlb_interrupts(cpu: int) -> int:
    """The TLB shootdowns ``cpu`` took since boot (x86's /proc/interrupts)."""
    with open("/proc/interrupts") as f:
        header = f.readline().split()
        for line in f:
            fields = line.split()
            if fields and fields[0] == "TLB:":
                return int(fields[1 + header.index(f"CPU{cpu}")])
    raise OSError(errno.ENOENT, "no TLB line in /proc/interrupts (not x86?)")


def run_shootdown(*, guest_cpus: str, seconds: float = 1.0, rounds: int = 3, memory: int = 64 << 20,
                  progress=None) -> dict:
    """``rounds`` pairs of windows of ``seconds``: idle, then flipping."""
    from luvmm.wiring import connect
    from luvmm.vmm.config import VmConfig
    from luvmm.vmm.vm import Vm

    cpu = min(parse_cpu_list(guest_cpus))
    rest = frozenset(os.sched_getaffinity(0)) - {cpu}
    if not rest:
        raise ValueError(f"CPU {cpu} is the only CPU this process may run on: nothing to send shootdowns from")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    state = StateDir(tempfile.mkdtemp(prefix="luvmm-bench-"))
    affinity = os.sched_getaffinity(0)
    saved_env = os.environ.get(GUEST_CPUS_ENV)
    vm = None
    try:
        hostctl.start(state, devices=1, dsa_bandwidth=64 << 20, guest_cpus=str(cpu))
        os.environ[GUEST_CPUS_ENV] = str(cpu)  # this process's vCPU thread goes there (vmm pin_vcpu)
        os.sched_setaffinity(0, rest)
        host, _ = connect("emulated", state.socket, state.path)
        vm = Vm(host, VmConfig("shootdown", memory=memory))
        vm.cold_boot()
        view, at = vm.memory.view, guest.offset("heartbeat")
        pages = mmap.mmap(-1, PAGES * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(pages))

        def beats() -> int:
            return struct.unpack_from("<Q", view, at)[0]

        def window(flip: bool) -> tuple[float, int]:
            t0, b0, s0 = time.perf_counter(), beats(), tlb_interrupts(cpu)
            while time.perf_counter() - t0 < seconds:
                if flip:
                    for n in range(PAGES):
                        pages[n * mmap.PAGESIZE] = 1  # present and writable again: the next flip shoots it down
                    libc.mprotect(addr, PAGES * mmap.PAGESIZE, PROT_READ)
                    libc.mprotect(addr, PAGES * mmap.PAGESIZE, PROT_READ | PROT_WRITE)
                time.sleep(0.0005)  # both windows: this thread's own share of its CPU alike
            return (beats() - b0) / (time.perf_counter() - t0), tlb_interrupts(cpu) - s0

        time.sleep(0.5)  # the guest past its start-up: what is measured is its steady state
        rows = []
        for n in range(rounds):
            idle, idle_sd = window(False)
            busy, shootdowns = window(True)
            lost_s = (1 - busy / idle) * seconds if idle else 0.0
            rows.append({"idle_pace_hz": idle, "flipping_pace_hz": busy, "shootdowns": shootdowns,
                         "idle_shootdowns": idle_sd,
                         "us_per_shootdown": round(1e6 * lost_s / shootdowns, 1) if shootdowns > 0 else None})
            if progress:
                progress(f"round {n + 1}/{rounds}")
    finally:
        if vm is not None:
            vm.close()
        os.sched_setaffinity(0, affinity)
        if saved_env is None:
            os.environ.pop(GUEST_CPUS_ENV, None)
        else:
            os.environ[GUEST_CPUS_ENV] = saved_env
        hostctl.stop(state)
        shutil.rmtree(state.path, ignore_errors=True)
    costs = sorted(r["us_per_shootdown"] for r in rows if r["us_per_shootdown"] is not None)
    return {"cpu": cpu, "seconds": seconds, "rounds": rows,
            "us_per_shootdown_p50": costs[len(costs) // 2] if costs else None}


def format_shootdown(result: dict) -> str:
    lines = [f"{'round':>5} {'idle pace /s':>14} {'flipping /s':>14} {'shootdowns':>10} {'us each':>8}"]
    for n, r in enumerate(result["rounds"], 1):
        cost = "-" if r["us_per_shootdown"] is None else f"{r['us_per_shootdown']:.1f}"
        lines.append(f"{n:>5} {r['idle_pace_hz']:>14,.0f} {r['flipping_pace_hz']:>14,.0f} {r['shootdowns']:>10} "
                     f"{cost:>8}")
    p50 = result["us_per_shootdown_p50"]
    lines.append(f"a TLB shootdown into the vCPU's CPU (CPU {result['cpu']}) costs the guest "
                 + ("(not measured)" if p50 is None else f"{p50:.1f} us (p50 of {len(result['rounds'])})"))
    return "\n".join(lines)
