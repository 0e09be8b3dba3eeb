"""The vCPU run loop in C (vmm/runloop.c): one :class:`RunLoop` per vCPU.

The VMM hands the loop what traps -- the BAR areas it could not map into the
guest, each with how it reaches the device -- and calls :meth:`RunLoop.run`
from the vCPU's thread; cffi releases the GIL for the call, and the loop
returns only for what the VMM's Python must decide (a kick, a trap of the
VMM's, an exit it does not serve).  A guest that drives its device through
mapped BARs and trapped registers never waits for the interpreter.

The compiled module is built at install time; a checkout whose C sources
are newer than it (or that was never installed) builds it in place on first
use (vmm/runloop_build.py).  Lean: the restore path imports this module.
"""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _built_current() -> bool:
    """Whether a built vmm._runloop is there and newer than its sources (a
    checkout edited since it was installed is not): a stat of each, this
    being the restore's path."""
    import _imp  # built in: importlib.machinery's EXTENSION_SUFFIXES without importlib

    try:
        sources = max(os.stat(os.path.join(HERE, name)).st_mtime_ns for name in ("runloop.c", "runloop.h"))
    except FileNotFoundError:
        return True  # installed without its sources: what was built is all there is
    for suffix in _imp.extension_suffixes():
        try:
            return os.stat(os.path.join(HERE, "_runloop" + suffix)).st_mtime_ns >= sources
        except FileNotFoundError:
            continue
    return False


def _load():
    if not _built_current():
        from luvmm.vmm import runloop_build

        runloop_build.build()
    from luvmm.vmm import _runloop

    return _runloop


_mod = _load()
ffi, lib = _mod.ffi, _mod.lib

TRAP_REGION, TRAP_PORTAL, TRAP_VMM = lib.LUVMM_TRAP_REGION, lib.LUVMM_TRAP_PORTAL, lib.LUVMM_TRAP_VMM
XPORT_PREADWRITE, XPORT_POSTED = lib.LUVMM_XPORT_PREADWRITE, lib.LUVMM_XPORT_POSTED
EXIT_DEVICE_ERROR = lib.LUVMM_EXIT_DEVICE_ERROR
SERVED = lib.LUVMM_SERVED
MAX_TRAPS = lib.LUVMM_MAX_TRAPS
TRAP_KINDS = {TRAP_REGION: "region", TRAP_PORTAL: "portal", TRAP_VMM: "vmm"}


def rdtsc() -> int:
    """The CPU's time-stamp counter (what the firmware stamps its heartbeat with)."""
    return lib.luvmm_rdtsc()


class Trap:
    """A guest-physical range the run loop serves (or hands to the VMM):
    ``kind`` TRAP_REGION / TRAP_PORTAL / TRAP_VMM; ``fd`` and ``offset``
    where the range starts in the device fd; ``transport`` XPORT_PREADWRITE
    (pread/pwrite(2)) or XPORT_POSTED (a posted write of ``wire_op`` on an
    emulated device's file socket; reads are the VMM's)."""

    __slots__ = ("gpa", "size", "kind", "fd", "offset", "transport", "wire_op", "name")

    def __init__(self, gpa: int, size: int, kind: int, *, fd: int = -1, offset: int = 0,
                 transport: int = XPORT_PREADWRITE, wire_op: int = 0, name: str = ""):
        self.gpa, self.size, self.kind, self.fd, self.offset = gpa, size, kind, fd, offset
        self.transport, self.wire_op, self.name = transport, wire_op, name

    def __repr__(self) -> str:
        return f"Trap({self.name or TRAP_KINDS[self.kind]} {self.gpa:#x}+{self.size:#x})"


class RunLoop:
    """One vCPU's run loop: its configuration and its counters (C memory)."""

    def __init__(self, vcpu_fd: int, kvm_run_addr: int):
        self._loop = ffi.new("struct luvmm_loop *")
        self._loop.vcpu_fd = vcpu_fd
        self._loop.run = ffi.cast("void *", kvm_run_addr)
        self._loop.irq_fd = -1
        self._loop.portal_line = -1
        self.traps: list[Trap] = []

    def configure(self, traps: list[Trap], *, irq_fd: int | None = None, wait_port: int = 0,
                  wait_s: float = 0.0, ram: list[tuple[int, int, int]] = ()) -> None:
        """What the loop serves: set before the vCPU's thread runs it (a
        live update builds new vCPUs, and new loops, on the restored device).
        ``ram``: (GPA, size, address in this process) of guest RAM, where a
        MOVDIR64B's source is read."""
        if len(traps) > MAX_TRAPS:
            raise ValueError(f"at most {MAX_TRAPS} trapped ranges, not {len(traps)}")
        if len(ram) > len(self._loop.ram):
            raise ValueError(f"at most {len(self._loop.ram)} RAM ranges")
        loop = self._loop
        for i, (gpa, size, hva) in enumerate(ram):
            loop.ram[i].gpa, loop.ram[i].size, loop.ram[i].hva = gpa, size, ffi.cast("uint8_t *", hva)
        loop.nram = len(ram)
        for i, t in enumerate(traps):
            c = loop.traps[i]
            c.gpa, c.size, c.kind, c.fd, c.offset = t.gpa, t.size, t.kind, t.fd, t.offset
            c.transport, c.wire_op = t.transport, t.wire_op
        loop.ntraps = len(traps)
        loop.irq_fd = -1 if irq_fd is None else irq_fd
        loop.wait_port = wait_port
        loop.wait_ms = max(1, round(wait_s * 1000)) if wait_port else 0
        self.traps = list(traps)

    def run(self) -> int:
        """Run the vCPU until an exit the VMM must see: its KVM_EXIT_ reason
        (in kvm_run), EXIT_DEVICE_ERROR (:attr:`error`), or -errno of KVM_RUN."""
        return lib.luvmm_run(self._loop)

    def serve(self) -> int:
        """Serve the exit now in kvm_run as the loop does after KVM_RUN
        (tests): SERVED, or what :meth:`run` would return for it."""
        return lib.luvmm_serve(self._loop)

    @property
    def error(self) -> int:
        return self._loop.error

    # --- the write-combining buffer: machine state (a pause may fall between two stores) -----------

    def translate(self, cr3: int, gva: int) -> int | None:
        """A guest-virtual address through the guest's page tables, as the loop walks them (None: not mapped)."""
        gpa = ffi.new("uint64_t *")
        return None if lib.luvmm_translate(self._loop, cr3, gva, gpa) else gpa[0]

    def portal_state(self) -> tuple[bytes, int, int] | None:
        """(64 bytes, the mask of those written, the portal line) or None: empty."""
        loop = self._loop
        if loop.portal_line < 0 or not loop.portal_mask:
            return None
        return bytes(ffi.buffer(loop.portal)), loop.portal_mask, loop.portal_line

    def set_portal_state(self, buf: bytes, mask: int, line: int) -> None:
        loop = self._loop
        ffi.memmove(loop.portal, bytes(buf)[:64].ljust(64, b"\0"), 64)
        loop.portal_mask, loop.portal_line = mask, line
        loop.portal_trap = next((i for i, t in enumerate(self.traps) if t.kind == TRAP_PORTAL), 0)

    # --- counters ----------------------------------------------------------------------------------

    @property
    def interrupts(self) -> int:
        return self._loop.interrupts

    @property
    def portal_writes(self) -> int:
        return self._loop.portal_writes

    def counters(self) -> dict:
        """Exits by KVM_EXIT_ reason (nonzero ones), how many went to the
        VMM, and what the loop served: accesses per trap, portal
        descriptors, interrupt waits, ignored port I/O."""
        loop = self._loop
        return {"exits": {r: loop.exits[r] for r in range(lib.LUVMM_EXIT_REASONS) if loop.exits[r]},
                "to_vmm": loop.handed, "portal_writes": loop.portal_writes, "movdir64b": loop.movdir64b,
                "irq_waits": loop.irq_waits,
                "interrupts": loop.interrupts, "io_ignored": loop.io_ignored,
                "serve_s": loop.serve_ns / 1e9, "max_serve_s": loop.max_serve_ns / 1e9,
                "traps": [{"name": t.name or TRAP_KINDS[t.kind], "reads": loop.traps[i].reads,
                           "writes": loop.traps[i].writes} for i, t in enumerate(self.traps)]}


def movdir64b_decode(insn: bytes, regs) -> tuple[int, int, int] | None:
    """(destination, source, length) of a MOVDIR64B, as the loop decodes it
    (``regs``: a ``struct kvm_regs`` of luvmm.abi's ffi, or its bytes); None: not one."""
    raw = bytes(regs) if isinstance(regs, (bytes, bytearray)) else bytes(_abi_buffer(regs))
    out = ffi.new("uint64_t[2]")
    length = ffi.new("uint32_t *")
    if lib.luvmm_movdir64b_decode(insn, len(insn), ffi.from_buffer("uint64_t[]", raw), out, out + 1, length):
        return None
    return out[0], out[1], length[0]


def _abi_buffer(cdata):
    from luvmm.abi import ffi as abi_ffi

    return abi_ffi.buffer(cdata)


def wire_header(op: int, length: int, offset: int) -> bytes:
    """The request header the loop sends for a posted write (checked against luvmm.wire.REQUEST)."""
    out = ffi.new("uint8_t[]", lib.LUVMM_WIRE_HEADER)
    lib.luvmm_wire_header(out, op, length, offset)
    return bytes(ffi.buffer(out))
