"""Runs inside the lab guest, in two stages around a real kexec: memfds through
luvmm's LUO handles (``LiveUpdate`` -> ``Session``) on a real kernel.

Stage 1 preserves a 4 MiB sealed memfd (guest RAM, as the VMM makes it) and a
small unsealed one with its position moved, records what the kernel does to a
preserved memfd before the reboot (the size freeze; writes inside the size
still allowed and kept), then kexecs from this very process, which holds the
session.  Stage 2 retrieves them and records contents, size, seals, position,
flags and what RETRIEVE_FD and FINISH answer.  ``memfd-1.json`` and
``memfd-2.json`` in the shared directory; tests/lab/test_lab_memfd.py asserts.

    python -m tests.lab.guest_memfd
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import traceback

from luvmm.host import RealHost
from luvmm.lab import guest
from luvmm.liveupdate.luo import LiveUpdate

SESSION = "luvmm-lab-memfd"
RAM_TOKEN, SMALL_TOKEN = 0x10, 0x20
RAM_SIZE = 4 << 20
SMALL_SIZE = 3 * 4096 + 123
SMALL_POS = 1000
LATE_OFFSET = 2 << 20  # written after PRESERVE_FD, before the reboot
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK


def pattern(size: int, seed: bytes) -> bytes:
    """Deterministic bytes: both stages (and the host) can regenerate them."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:size])


LATE = pattern(4096, b"late")


def errno_of(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


def stage1() -> dict:
    host = RealHost()
    ram = os.memfd_create("lab-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(ram, RAM_SIZE)
    with mmap.mmap(ram, RAM_SIZE) as m:
        m[:] = pattern(RAM_SIZE, b"ram")
    fcntl.fcntl(ram, fcntl.F_ADD_SEALS, SEALS)
    small = os.memfd_create("lab-small", os.MFD_CLOEXEC)
    os.write(small, pattern(SMALL_SIZE, b"small"))
    os.lseek(small, SMALL_POS, os.SEEK_SET)

    luo = LiveUpdate.open(host)
    session = luo.create_session(SESSION)
    session.preserve_fd(ram, RAM_TOKEN)
    session.preserve_fd(small, SMALL_TOKEN)
    out = {
        "seals_before": fcntl.fcntl(ram, fcntl.F_GET_SEALS),
        "small_seals_before": fcntl.fcntl(small, fcntl.F_GET_SEALS),  # F_SEAL_SEAL: made without ALLOW_SEALING
        # The size of a preserved memfd is frozen (shmem_freeze in memfd_luo_preserve):
        "ftruncate_grow_errno": errno_of(os.ftruncate, small, SMALL_SIZE + 4096),
        "ftruncate_shrink_errno": errno_of(os.ftruncate, small, 100),
        "write_past_end_errno": errno_of(os.pwrite, small, b"x", SMALL_SIZE + 10),
        "fallocate_errno": errno_of(os.posix_fallocate, small, 0, SMALL_SIZE + 8192),
        "size_after_attempts": os.fstat(small).st_size,
        # ...but its contents may change up to the reboot, and the new kernel gets them:
        "late_write": os.pwrite(ram, LATE, LATE_OFFSET),
        "preserve_again_errno": errno_of(session.preserve_fd, ram, 0x99),
        "token_reused_errno": errno_of(session.preserve_fd, os.memfd_create("other"), RAM_TOKEN),
        "second_open_errno": errno_of(LiveUpdate.open, host),
        "release": os.uname().release,
    }
    guest.save("memfd-1.json", out)
    guest.kexec()  # this process holds the session: it is alive until the reboot


def stage2() -> dict:
    host = RealHost()
    luo = LiveUpdate.open(host)
    out: dict = {"release": os.uname().release}
    out["retrieve_unknown_session_errno"] = errno_of(luo.retrieve_session, "no-such-session")
    session = luo.retrieve_session(SESSION)
    out["session_name"] = session.get_name()
    ram = session.retrieve_fd(RAM_TOKEN)
    small = session.retrieve_fd(SMALL_TOKEN)
    out["unknown_token_errno"] = errno_of(session.retrieve_fd, 0x77)
    again = session.retrieve_fd(RAM_TOKEN)  # LUO hands out the same file again
    out["retrieved_again_same_file"] = os.fstat(again).st_ino == os.fstat(ram).st_ino
    os.close(again)
    with mmap.mmap(ram, 0, prot=mmap.PROT_READ) as m:
        data = bytes(m)
    expected = bytearray(pattern(RAM_SIZE, b"ram"))
    expected[LATE_OFFSET:LATE_OFFSET + len(LATE)] = LATE
    first_diff = next((i for i in range(0, len(expected), 4096) if data[i:i + 4096] != expected[i:i + 4096]), None)
    out.update({
        "ram_size": os.fstat(ram).st_size,
        "ram_equal": data == bytes(expected),
        "ram_first_differing_page_offset": first_diff,
        "ram_sha256": hashlib.sha256(data).hexdigest(),
        "ram_expected_sha256": hashlib.sha256(expected).hexdigest(),
        "ram_seals": fcntl.fcntl(ram, fcntl.F_GET_SEALS),
        "ram_flags": fcntl.fcntl(ram, fcntl.F_GETFL),
        "ram_cloexec": not os.get_inheritable(ram),
        "small_size": os.fstat(small).st_size,
        "small_equal": os.pread(small, SMALL_SIZE + 100, 0) == pattern(SMALL_SIZE, b"small"),
        "small_position": os.lseek(small, 0, os.SEEK_CUR),
        "small_seals": fcntl.fcntl(small, fcntl.F_GET_SEALS),
        "small_cloexec": not os.get_inheritable(small),
        "session_cloexec": not os.get_inheritable(session.fd),
    })
    # The retrieved memfd is a new file (memfd_luo_retrieve): is its size frozen?
    out["small_ftruncate_retrieved_errno"] = errno_of(os.ftruncate, small, SMALL_SIZE + 4096)
    out["small_size_after_ftruncate"] = os.fstat(small).st_size
    out["retrieve_session_twice_errno"] = errno_of(luo.retrieve_session, SESSION)
    session.finish()
    out["finish"] = 0
    out["ram_still_readable_after_finish"] = os.pread(ram, 32, 0) == pattern(32, b"ram")
    # Finished but its fd still open: the session is still there, retrieved.
    out["retrieve_session_after_finish_before_close_errno"] = errno_of(luo.retrieve_session, SESSION)
    out["retrieve_fd_after_finish_errno"] = errno_of(session.retrieve_fd, RAM_TOKEN)
    session.close()
    out["retrieve_after_finish_errno"] = errno_of(luo.retrieve_session, SESSION)
    return out


def main() -> int:
    n = guest.stage()
    try:
        if n == 1:
            stage1()  # does not return: kexec
            return 1
        guest.save("memfd-2.json", stage2())
        return 0
    except Exception as e:  # noqa: BLE001 - recorded for the host-side test
        guest.save(f"memfd-{n}-error.json", {"exception": f"{type(e).__name__}: {e}",
                                              "traceback": traceback.format_exc()})
        print(traceback.format_exc())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
