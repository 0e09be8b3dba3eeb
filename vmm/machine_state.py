"""The machine-state blob: everything about a VM that is not its RAM.

One versioned, magic-tagged, checksummed record (as nanovmm does), written
into a preserved memfd when the VMM prepares for a live update and read back
by the VMM the new kernel's init starts:

    b"LUVMMST\\0" | u32 version | u32 crc32 of the body | u64 body length | body

The body is JSON: the guest config, each vCPU's ``kvm_regs`` and
``kvm_sregs`` (their raw bytes, hex), the device wiring (BDF, iommufd object
ids, BAR addresses, armed MSI-X vectors) and the phase timestamps taken so
far.  A blob that is short, has the wrong magic or version, or fails its
checksum is refused with a message: a VMM never resumes from a guess.

The last 16 bytes of the state memfd hold when the blob was written
(b"LUVMMSV\0" | f64 CLOCK_REALTIME): the one phase timestamp that cannot be
inside the blob it times.
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
VERSION = 1
HEADER = struct.Struct("<8sIIQ")
STATE_MEMFD_SIZE = 1 << 20  # fixed: a preserved memfd's size is frozen
SAVED = struct.Struct("<8sd")
SAVED_MAGIC = b"LUVMMSV\0"


class StateError(ValueError):
    """A machine-state blob that cannot be trusted."""


def encode(state: dict) -> bytes:
    body = leanjson.dumps(state, sort_keys=True).encode()
    if HEADER.size + len(body) > STATE_MEMFD_SIZE:
        raise StateError(f"machine state of {len(body)} bytes does not fit the state memfd")
    return HEADER.pack(MAGIC, VERSION, zlib.crc32(body), len(body)) + body


def write(fd: int, state: dict) -> float:
    """Write the blob into the state memfd; returns (and stamps) when it was written."""
    blob = encode(state)
    if len(blob) + 64 > STATE_MEMFD_SIZE - SAVED.size:
        raise StateError(f"machine state of {len(blob)} bytes does not fit the state memfd")
    os.pwrite(fd, blob + bytes(64), 0)
    saved = time.time()
    os.pwrite(fd, SAVED.pack(SAVED_MAGIC, saved), STATE_MEMFD_SIZE - SAVED.size)
    return saved


def mark_resumed(fd: int) -> None:
    os.pwrite(fd, RESUMED_MAGIC, 0)


def read(fd: int) -> dict:
    """The state in a state memfd, with ``phases["saved"]`` from its stamp."""
    blob = os.pread(fd, STATE_MEMFD_SIZE, 0)
    state = decode(blob)
    if len(blob) == STATE_MEMFD_SIZE:
        magic, saved = SAVED.unpack_from(blob, STATE_MEMFD_SIZE - SAVED.size)
        phases = state.get("phases")
        if magic == SAVED_MAGIC and isinstance(phases, dict) and saved >= phases.get("stopped", saved):
            phases["saved"] = saved
    return state


def decode(blob: bytes) -> dict:
    if len(blob) < HEADER.size:
        raise StateError(f"machine state of {len(blob)} bytes is shorter than its header")
    magic, version, crc, length = HEADER.unpack_from(blob)
    if magic == RESUMED_MAGIC:
        raise StateError("this machine state was resumed from already: the guest has run on since it was "
                         "saved, and resuming it again would take the guest back in time")
    if magic != MAGIC:
        raise StateError("not a luvmm machine state (bad magic)")
    if version != VERSION:
        raise StateError(f"machine state version {version}; this VMM reads version {VERSION}")
    body = blob[HEADER.size:HEADER.size + length]
    if len(body) != length:
        raise StateError(f"machine state truncated: {len(body)} of {length} bytes")
    if zlib.crc32(body) != crc:
        raise StateError("machine state checksum mismatch")
    try:
        state = leanjson.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise StateError(f"machine state body is not JSON: {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("vcpus"), list):
        raise StateError("machine state has no vCPUs")
    return state
