"""The machine-state blob: everything about a VM that is not its RAM, as
typed, versioned sections with one encoder and one decoder -- what the VMM
writes into a preserved memfd when it prepares for a live update, what the
VMM of the next kernel restores from, and what a restarted VMM and the
reports read.

    b"LUVMMST\\0" | u32 version | u32 crc32 of the body | u64 body length | body

The body is JSON, one object per section (Firecracker's MicrovmState and
Cloud Hypervisor's Snapshottable do the same, one section per part):

    vcpus       [VcpuState]  each vCPU's kvm_regs and kvm_sregs (raw bytes),
                             or the synthetic guest's "registers"
    memory      MemoryState  guest RAM's size (the pages are the RAM memfd's)
    device      DeviceWiring the passed-through function: BDF, iommufd object
                             ids, armed MSI-X (the files are in the session)
    guest       GuestState   the VM's config, the portal write-combining
                             buffers, the mailbox and interrupt counts at the pause
    timestamps  Timestamps   the phase marks taken so far (CLOCK_REALTIME), the
                             pause on the TSC (optional), and what was in
                             flight at the pause

A blob that is short, has the wrong magic or an unknown version, fails its
checksum, or whose sections do not have their fields is refused with a
message: a VMM never resumes from a guess.

**The version rule.**  VERSION changes when a section gains, loses or
changes the meaning of a field that an older reader would need or misread,
or when a section is added that a VM cannot be restored without.  A VMM
reads its own version and the one before it (a live update may install a
newer luvmm: the VMM of the new kernel restores the blob the old one wrote),
so every bump comes with a reader of the previous layout.  Version 1 was one
flat object (config, vcpus, portal, device, phases, mailbox, interrupts);
version 2 is these sections.  Adding an optional field that a reader can do
without (given a default) does not bump it.

The last 16 bytes of the state memfd hold when the blob was written
(b"LUVMMSV\\0" | f64 CLOCK_REALTIME): the one phase timestamp that cannot be
inside the blob it times.  Lean: the restore path imports this module.
"""

from __future__ import annotations

import os
import struct
import time
import zlib

from luvmm import leanjson

MAGIC = b"LUVMMST\0"
#: Written over MAGIC just before the restored guest runs: from then on the
#: guest moves on from this state, and resuming it again would take the guest
#: back in time (RAM and device ahead of the vCPUs).
RESUMED_MAGIC = b"LUVMMSR\0"
VERSION = 2
READABLE = (1, 2)
HEADER = struct.Struct("<8sIIQ")
STATE_MEMFD_SIZE = 1 << 20  # fixed: a preserved memfd's size is frozen
SAVED = struct.Struct("<8sd")
SAVED_MAGIC = b"LUVMMSV\0"


class StateError(ValueError):
    """A machine-state blob that cannot be trusted."""


def _field(d: dict, name: str, kind, section: str):
    value = d.get(name) if isinstance(d, dict) else None
    if not isinstance(value, kind) or kind is int and isinstance(value, bool):
        raise StateError(f"machine state section {section}: {name!r} missing or not {getattr(kind, '__name__', kind)}")
    return value


class VcpuState:
    """One vCPU: its ``kvm_regs`` and ``kvm_sregs`` as the kernel laid them
    out and the CPUID it was given (a ``struct kvm_cpuid2`` with its
    entries: the guest goes on seeing the CPU it booted on, whatever the new
    kernel's KVM would offer; optional -- a blob without it restores with the
    CPUID KVM supports), or (the synthetic guest) its own registers."""

    __slots__ = ("id", "regs", "sregs", "cpuid", "synthetic")

    def __init__(self, id: int, regs: bytes = b"", sregs: bytes = b"", synthetic: dict | None = None,
                 cpuid: bytes = b""):
        self.id, self.regs, self.sregs, self.synthetic, self.cpuid = id, regs, sregs, synthetic, cpuid

    def to_dict(self) -> dict:
        if self.synthetic is not None:
            return {"id": self.id, "synthetic": self.synthetic}
        d = {"id": self.id, "regs": self.regs.hex(), "sregs": self.sregs.hex()}
        if self.cpuid:
            d["cpuid"] = self.cpuid.hex()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VcpuState:
        vid = _field(d, "id", int, "vcpus")
        if "synthetic" in d:
            return cls(vid, synthetic=_field(d, "synthetic", dict, "vcpus"))
        try:
            return cls(vid, bytes.fromhex(_field(d, "regs", str, "vcpus")),
                       bytes.fromhex(_field(d, "sregs", str, "vcpus")),
                       cpuid=bytes.fromhex(_field(d, "cpuid", str, "vcpus")) if "cpuid" in d else b"")
        except ValueError:
            raise StateError("machine state section vcpus: registers are not hex") from None


class MemoryState:
    __slots__ = ("size",)

    def __init__(self, size: int):
        self.size = size

    def to_dict(self) -> dict:
        return {"size": self.size}

    @classmethod
    def from_dict(cls, d: dict) -> MemoryState:
        return cls(_field(d, "size", int, "memory"))


class DeviceWiring:
    """How the passed-through function is wired: what a VMM needs to put it
    back together (after a kexec, or restarted on the files of one that died)."""

    __slots__ = ("bdf", "ioas", "hwpt", "dev_id", "msix_armed", "preserved")

    def __init__(self, bdf: str, ioas: int, hwpt: int, dev_id: int = 0, msix_armed: bool = False,
                 preserved: bool = True):
        self.bdf, self.ioas, self.hwpt, self.dev_id, self.msix_armed = bdf, ioas, hwpt, dev_id, msix_armed
        #: Whether the device and its iommufd are in the LUO session (a kernel
        #: without their LUO handlers -- mainline -- keeps only the memfds):
        #: optional, True when absent, as every blob before it was written.
        self.preserved = preserved

    def to_dict(self) -> dict:
        return {"bdf": self.bdf, "ioas": self.ioas, "hwpt": self.hwpt, "dev_id": self.dev_id, "msix": self.msix_armed,
                "preserved": self.preserved}

    @classmethod
    def from_dict(cls, d: dict) -> DeviceWiring:
        return cls(_field(d, "bdf", str, "device"), _field(d, "ioas", int, "device"), _field(d, "hwpt", int, "device"),
                   d.get("dev_id", 0) if isinstance(d.get("dev_id", 0), int) else 0, bool(d.get("msix", False)),
                   bool(d.get("preserved", True)))


class GuestState:
    __slots__ = ("config", "portal", "mailbox", "interrupts")

    def __init__(self, config: dict, portal: dict | None = None, mailbox: dict | None = None, interrupts: int = 0):
        self.config, self.portal, self.mailbox, self.interrupts = config, portal or {}, mailbox or {}, interrupts

    def to_dict(self) -> dict:
        return {"config": self.config, "portal": self.portal, "mailbox": self.mailbox, "interrupts": self.interrupts}

    @classmethod
    def from_dict(cls, d: dict) -> GuestState:
        return cls(_field(d, "config", dict, "guest"), d.get("portal") or {}, d.get("mailbox") or {},
                   d.get("interrupts", 0) if isinstance(d.get("interrupts", 0), int) else 0)

    def portal_buffers(self) -> dict[int, tuple[bytearray, int, int]]:
        """The write-combining buffers: vCPU -> (64 bytes, the mask of bytes written, the portal line)."""
        try:
            return {int(v): (bytearray.fromhex(buf), mask, line) for v, (buf, mask, line) in self.portal.items()}
        except (ValueError, TypeError):
            raise StateError("machine state section guest: bad portal buffers") from None


class Timestamps:
    """The phase marks taken so far (``prepare``, ``stopped``, ``saved``...:
    CLOCK_REALTIME) and what the guest had in flight at the pause.  ``tsc``
    (optional, {"stopped": TSC}): the pause on the clock the guest stamps its
    pace ring with (luvmm.vmm.guest.pace_ring), which the new VMM measures the
    guest's outage on where no observer watches its heartbeat; a blob
    without it (an older VMM's) restores the same, its outage not measured."""

    __slots__ = ("marks", "mailbox_at_pause", "inflight_at_pause", "tsc")

    def __init__(self, marks: dict, mailbox_at_pause: dict | None = None, inflight_at_pause: dict | None = None,
                 tsc: dict | None = None):
        self.marks, self.mailbox_at_pause, self.inflight_at_pause = marks, mailbox_at_pause or {}, inflight_at_pause or {}
        self.tsc = tsc or {}

    def to_dict(self) -> dict:
        out = {"marks": self.marks, "mailbox_at_pause": self.mailbox_at_pause,
               "inflight_at_pause": self.inflight_at_pause}
        if self.tsc:
            out["tsc"] = self.tsc
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Timestamps:
        tsc = d.get("tsc") if isinstance(d.get("tsc"), dict) else {}
        return cls(_field(d, "marks", dict, "timestamps"), d.get("mailbox_at_pause") or {},
                   d.get("inflight_at_pause") or {},
                   {k: v for k, v in tsc.items() if type(v) is int and v > 0})  # optional: what is not a TSC is left out


class MachineState:
    """The sections of one VM's state."""

    __slots__ = ("vcpus", "memory", "device", "guest", "timestamps")

    def __init__(self, vcpus: list[VcpuState], memory: MemoryState, device: DeviceWiring, guest: GuestState,
                 timestamps: Timestamps):
        self.vcpus, self.memory, self.device, self.guest, self.timestamps = vcpus, memory, device, guest, timestamps

    def to_dict(self) -> dict:
        return {"vcpus": [v.to_dict() for v in self.vcpus], "memory": self.memory.to_dict(),
                "device": self.device.to_dict(), "guest": self.guest.to_dict(),
                "timestamps": self.timestamps.to_dict()}

    @classmethod
    def from_dict(cls, body: dict, version: int = VERSION) -> MachineState:
        if not isinstance(body, dict):
            raise StateError("machine state body is not an object")
        if version == 1:
            body = _from_version_1(body)
        vcpus = body.get("vcpus")
        if not isinstance(vcpus, list):
            raise StateError("machine state has no vCPUs")
        return cls([VcpuState.from_dict(v) for v in vcpus], MemoryState.from_dict(body.get("memory")),
                   DeviceWiring.from_dict(body.get("device")), GuestState.from_dict(body.get("guest")),
                   Timestamps.from_dict(body.get("timestamps")))


def _from_version_1(body: dict) -> dict:
    """Version 1's flat object, in version 2's sections (a VMM reads the version before its own)."""
    config = body.get("config") if isinstance(body.get("config"), dict) else {}
    phases = dict(body.get("phases") or {}) if isinstance(body.get("phases"), dict) else {}
    return {"vcpus": body.get("vcpus"), "memory": {"size": config.get("memory", 0)},
            "device": body.get("device"),
            "guest": {"config": config, "portal": body.get("portal"), "mailbox": body.get("mailbox"),
                      "interrupts": body.get("interrupts", 0)},
            "timestamps": {"mailbox_at_pause": phases.pop("mailbox_at_pause", None),
                           "inflight_at_pause": phases.pop("inflight_at_pause", None), "marks": phases}}


def encode(state: MachineState) -> bytes:
    body = leanjson.dumps(state.to_dict(), sort_keys=True).encode()
    if HEADER.size + len(body) > STATE_MEMFD_SIZE - SAVED.size - 64:
        raise StateError(f"machine state of {len(body)} bytes does not fit the state memfd")
    return HEADER.pack(MAGIC, VERSION, zlib.crc32(body), len(body)) + body


def write(fd: int, state: MachineState) -> float:
    """Write the blob into the state memfd; returns (and stamps) when it was written."""
    blob = encode(state)
    os.pwrite(fd, blob + bytes(64), 0)
    saved = time.time()
    os.pwrite(fd, SAVED.pack(SAVED_MAGIC, saved), STATE_MEMFD_SIZE - SAVED.size)
    return saved


def mark_resumed(fd: int) -> None:
    os.pwrite(fd, RESUMED_MAGIC, 0)


def read(fd: int) -> MachineState:
    """The state in a state memfd, with ``timestamps.marks["saved"]`` from its stamp."""
    blob = os.pread(fd, STATE_MEMFD_SIZE, 0)
    state = decode(blob)
    if len(blob) == STATE_MEMFD_SIZE:
        magic, saved = SAVED.unpack_from(blob, STATE_MEMFD_SIZE - SAVED.size)
        marks = state.timestamps.marks
        if magic == SAVED_MAGIC and saved >= marks.get("stopped", saved):
            marks["saved"] = saved
    return state


def decode(blob: bytes) -> MachineState:
    if len(blob) < HEADER.size:
        raise StateError(f"machine state of {len(blob)} bytes is shorter than its header")
    magic, version, crc, length = HEADER.unpack_from(blob)
    if magic == RESUMED_MAGIC:
        raise StateError("this machine state was resumed from already: the guest has run on since it was "
                         "saved, and resuming it again would take the guest back in time")
    if magic != MAGIC:
        raise StateError("not a luvmm machine state (bad magic)")
    if version not in READABLE:
        raise StateError(f"machine state version {version}; this VMM reads versions "
                         f"{', '.join(map(str, READABLE))}")
    body = blob[HEADER.size:HEADER.size + length]
    if len(body) != length:
        raise StateError(f"machine state truncated: {len(body)} of {length} bytes")
    if zlib.crc32(body) != crc:
        raise StateError("machine state checksum mismatch")
    try:
        parsed = leanjson.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise StateError(f"machine state body is not JSON: {e}") from None
    return MachineState.from_dict(parsed, version)
