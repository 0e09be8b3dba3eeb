"""`luvmm bench dsa`: the emulated DSA's data path against this machine's memcpy.

Every figure goes through the full path a driver uses: a descriptor is
written to the portal, the engine translates its IOVAs through the IOMMU
domain, copies, and writes the completion record the driver polls.  The
MEMMOVE runs keep up to 64 descriptors in flight (each with its own record),
as a driver that wants throughput does; the memcpy baseline copies the same
buffers the same number of times with ``ctypes.memmove`` in the same process.
"""

from __future__ import annotations

import ctypes
import os
import select
import time

from luvmm.devices.emu.dsa import DsaDevice
from luvmm.devices.emu.dsa_driver import MSIX_VECTOR, STATE_SIZE, DmaBuffer, DsaDriver
from luvmm.uapi.idxd import (
    DSA_COMP_SUCCESS,
    DSA_OPCODE_MEMMOVE,
    IDXD_OP_FLAG_CRAV,
    IDXD_OP_FLAG_RCI,
    IDXD_OP_FLAG_RCR,
    pack_desc,
)
from luvmm.devices.emu.iommu import IommuDomain
from luvmm.devices.emu.memory import PhysMem

SIZES = (4096, 65536, 1 << 20)
IOVA = 0x1_0000_0000
DEPTH = 64  # descriptors in flight (the WQ holds 128)
RECORDS = STATE_SIZE  # completion records area: DEPTH x 32 bytes
SRC = 0x40_0000
DST = 0x80_0000


class _Bench:
    def __init__(self):
        self.dev = DsaDevice("0000:00:00.0")
        self.dev.start()
        self.memfd = os.memfd_create("luvmm-bench-dsa", os.MFD_ALLOW_SEALING)
        os.ftruncate(self.memfd, 16 << 20)
        self.mem = PhysMem(self.memfd)
        domain = IommuDomain("bench")
        domain.map(IOVA, self.mem, 0, 16 << 20)
        self.dev.attach_domain(domain)
        self.driver = DsaDriver(self.dev, DmaBuffer(self.mem.view[:SRC], IOVA))
        self.driver.init()
        self.eventfd = os.eventfd(0, os.EFD_CLOEXEC)
        self.dev.msix.set_eventfd(MSIX_VECTOR, self.eventfd)
        self.mem.view[SRC:SRC + (1 << 20)] = os.urandom(1 << 20)

    def close(self) -> None:
        self.dev.shutdown()
        os.close(self.eventfd)
        self.driver.mem.view.release()
        self.mem.close()
        os.close(self.memfd)

    def _window_done(self, window: int, base: int, count: int) -> None:
        """Sleep until window ``window``'s interrupt (interrupts are counted: two
        windows may finish before the driver looks), then check and clear its records."""
        while self.interrupts <= window:
            ready, _, _ = select.select([self.eventfd], [], [], 10)
            if not ready:
                raise RuntimeError("benchmark window never completed")
            self.interrupts += os.eventfd_read(self.eventfd)
        view = self.mem.view
        for slot in range(base, base + count):
            status = view[RECORDS + 32 * slot]
            if status != DSA_COMP_SUCCESS:
                raise RuntimeError(f"benchmark descriptor failed: status {status:#x}")
            view[RECORDS + 32 * slot] = 0

    def memmove_gbps(self, size: int, total: int) -> float:
        """Windows of HALF descriptors, each with its own record; the last of a
        window asks for an interrupt.  While one window runs the driver sleeps
        on the other's interrupt (an eventfd), then checks its records and
        refills it: the engine never waits for the driver."""
        half = DEPTH // 2
        windows = max(2, total // size // half)
        view = self.mem.view
        descs = []
        for slot in range(DEPTH):
            last = slot % half == half - 1
            flags = IDXD_OP_FLAG_CRAV | IDXD_OP_FLAG_RCR | (IDXD_OP_FLAG_RCI if last else 0)
            descs.append(pack_desc(opcode=DSA_OPCODE_MEMMOVE, flags=flags, src=IOVA + SRC, dst=IOVA + DST,
                                   xfer_size=size, completion_addr=IOVA + RECORDS + 32 * slot,
                                   int_handle=MSIX_VECTOR if last else 0))
        view[RECORDS:RECORDS + 32 * DEPTH] = bytes(32 * DEPTH)
        self.interrupts = 0
        start = time.perf_counter()
        for w in range(windows):
            base = (w % 2) * half
            if w >= 2:
                self._window_done(w - 2, base, half)
            for slot in range(base, base + half):
                self.driver.desc_write(descs[slot])
        for w in range(max(0, windows - 2), windows):
            self._window_done(w, (w % 2) * half, half)
        elapsed = time.perf_counter() - start
        count = windows * half
        self.driver.check_sw_err()
        if view[DST:DST + size] != view[SRC:SRC + size]:
            raise RuntimeError("benchmark copy is wrong")
        return size * count / elapsed / 1e9

    def memcpy_gbps(self, size: int, total: int) -> float:
        count = max(DEPTH, total // size)
        src, dst = self.mem.address + SRC, self.mem.address + DST
        memmove = ctypes.memmove
        start = time.perf_counter()
        for _ in range(count):
            memmove(dst, src, size)
        return size * count / (time.perf_counter() - start) / 1e9

    def descriptors_per_s(self, batches: int) -> float:
        """64-byte MEMMOVEs submitted in batches of 1024 (the selftest driver's way)."""
        drv = self.driver
        count = batches * 1024
        start = time.perf_counter()
        drv.memcpy_start(IOVA + SRC, IOVA + DST, 64, count)
        drv.memcpy_wait()
        return count / (time.perf_counter() - start)


def run(total_bytes: int = 256 << 20, batches: int = 32) -> dict:
    bench = _Bench()
    try:
        result = {"memmove_gbps": {}, "memcpy_gbps": {}, "ratio": {}}
        for size in SIZES:
            total = min(total_bytes, size * 20000)
            bench.memmove_gbps(size, total // 8)  # warm up
            mm = bench.memmove_gbps(size, total)
            mc = bench.memcpy_gbps(size, total)
            result["memmove_gbps"][str(size)] = round(mm, 3)
            result["memcpy_gbps"][str(size)] = round(mc, 3)
            result["ratio"][str(size)] = round(mm / mc, 3)
        bench.descriptors_per_s(2)  # warm up
        result["descriptors_per_s"] = round(max(bench.descriptors_per_s(batches) for _ in range(3)))
        return result
    finally:
        bench.close()


def format_table(result: dict) -> str:
    lines = [f"{'size':>10}  {'MEMMOVE GB/s':>12}  {'memcpy GB/s':>11}  {'ratio':>6}"]
    for size in result["memmove_gbps"]:
        lines.append(f"{int(size):>10}  {result['memmove_gbps'][size]:>12.2f}  "
                     f"{result['memcpy_gbps'][size]:>11.2f}  {result['ratio'][size]:>6.2f}")
    lines.append(f"descriptors/s (64-byte MEMMOVEs in batches of 1024): {result['descriptors_per_s']:,}")
    return "\n".join(lines)
