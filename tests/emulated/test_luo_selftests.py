"""Python ports of the kernel's LUO selftests (tools/testing/selftests/liveupdate),
run against the emulated host through the host interface, plus the other
LUO rules of docs/emulated-host.md ("The rules of the real kernel"), errno for
errno (what mainline itself answers: docs/lab.md, "Facts of mainline 7.2")."""

import errno
import fcntl
import os
import struct

import pytest

from tests.support.helpers import errno_of

from luvmm.abi import new_arg, ffi
from luvmm.liveupdate.luo import LiveUpdate
from luvmm.uapi.luo import (
    LIVEUPDATE_IOCTL_CREATE_SESSION,
    LIVEUPDATE_SESSION_FINISH,
    LIVEUPDATE_SESSION_GET_NAME,
    LIVEUPDATE_SESSION_PRESERVE_FD,
)


def memfd_with(data: bytes, name="luo-test", flags=0) -> int:
    fd = os.memfd_create(name, flags)
    os.write(fd, data)
    return fd



# --- liveupdate.c ------------------------------------------------------------------------------

def test_basic_open_close(emulated_host):
    LiveUpdate.open(emulated_host.host).close()


def test_exclusive_open(emulated_host):
    luo = LiveUpdate.open(emulated_host.host)
    assert errno_of(LiveUpdate.open, emulated_host.host) == errno.EBUSY
    luo.close()
    LiveUpdate.open(emulated_host.host).close()  # free again once closed


def test_create_duplicate_session(emulated_host):
    luo = LiveUpdate.open(emulated_host.host)
    luo.create_session("duplicate-session-test")
    assert errno_of(luo.create_session, "duplicate-session-test") == errno.EEXIST


def test_create_distinct_sessions(emulated_host):
    luo = LiveUpdate.open(emulated_host.host)
    a, b = luo.create_session("distinct-session-1"), luo.create_session("distinct-session-2")
    assert a.fd >= 0 and b.fd >= 0 and a.fd != b.fd


def test_preserve_memfd(emulated_host):
    session = LiveUpdate.open(emulated_host.host).create_session("preserve-memfd-test")
    session.preserve_fd(memfd_with(b"memfd-data"), 0x1234)


def test_preserve_multiple_memfds(emulated_host):
    session = LiveUpdate.open(emulated_host.host).create_session("preserve-multi-memfd-test")
    for i in range(2):
        session.preserve_fd(memfd_with(f"data-{i}".encode()), 0xAAAA + i)


def test_preserve_complex_scenario(emulated_host):
    luo = LiveUpdate.open(emulated_host.host)
    s1, s2 = luo.create_session("complex-session-1"), luo.create_session("complex-session-2")
    s1.preserve_fd(memfd_with(b"one"), 0x1111)
    s2.preserve_fd(memfd_with(b"two"), 0x2222)
    s1.preserve_fd(memfd_with(b"three"), 0x3333)
    s2.preserve_fd(memfd_with(b"four"), 0x4444)


def test_preserve_unsupported_fd(emulated_host):
    session = LiveUpdate.open(emulated_host.host).create_session("unsupported-fd-test")
    devnull = os.open("/dev/null", os.O_RDWR)
    assert errno_of(session.preserve_fd, devnull, 0xDEAD) == errno.ENOENT
    efd = os.eventfd(0)
    assert errno_of(session.preserve_fd, efd, 0xBEEF) == errno.ENOENT


def test_prevent_double_preservation(emulated_host):
    luo = LiveUpdate.open(emulated_host.host)
    s1, s2 = luo.create_session("double-preserve-session-1"), luo.create_session("double-preserve-session-2")
    mem = os.memfd_create("test-memfd", 0)
    s1.preserve_fd(mem, 0x1111)
    assert errno_of(s2.preserve_fd, mem, 0x2222) == errno.EBUSY
    assert errno_of(s1.preserve_fd, mem, 0x3333) == errno.EBUSY


def _create_raw(host, luo_fd, name: bytes, size=72):
    arg = bytearray(max(size, 72))
    struct.pack_into("<Ii", arg, 0, size, -1)
    arg[8:8 + len(name)] = name
    return host.ioctl(luo_fd, LIVEUPDATE_IOCTL_CREATE_SESSION, arg)


def test_create_session_no_null_termination(emulated_host):
    luo = LiveUpdate.open(emulated_host.host)
    assert errno_of(_create_raw, emulated_host.host, luo.fd, b"A" * 64) == errno.EINVAL


def test_create_session_empty_name(emulated_host):
    luo = LiveUpdate.open(emulated_host.host)
    assert errno_of(luo.create_session, "") == errno.EINVAL


def test_create_session_takes_any_bytes(emulated_host):
    """luo_session_create checks only the length (strnlen): the name is any
    bytes, and GET_NAME gives the same bytes back."""
    host = emulated_host.host
    luo = LiveUpdate.open(host)
    arg = bytearray(72)
    struct.pack_into("<Ii", arg, 0, 72, -1)
    arg[8:12] = b"\xff\xfe\x80\x01"
    host.ioctl(luo.fd, LIVEUPDATE_IOCTL_CREATE_SESSION, arg)
    name = new_arg("struct liveupdate_session_get_name")
    host.ioctl(struct.unpack_from("<i", arg, 4)[0], LIVEUPDATE_SESSION_GET_NAME, ffi.buffer(name))
    assert ffi.string(name.name) == b"\xff\xfe\x80\x01"


def test_retrieve_session_names_are_not_length_checked(emulated_host):
    """luo_session_retrieve only strncmp()s the name: empty or 64 bytes with
    no NUL are -ENOENT like any unknown name, not -EINVAL."""
    host = emulated_host.host
    luo = LiveUpdate.open(host)
    assert errno_of(luo.retrieve_session, "") == errno.ENOENT
    assert errno_of(luo.retrieve_session, b"R" * 64) == errno.ENOENT


def test_close_then_create_the_same_name(emulated_host):
    """luo_session_release removes the session before close() returns."""
    luo = LiveUpdate.open(emulated_host.host)
    mem = memfd_with(b"again")
    for _ in range(20):
        session = luo.create_session("again")
        session.preserve_fd(mem, 1)
        session.close()


def test_preserve_fd_token_checked_first(emulated_host):
    """luo_preserve_file: a used token is -EEXIST before fget (-EBADF) and
    before the handler lookup (-ENOENT)."""
    session = LiveUpdate.open(emulated_host.host).create_session("order")
    session.preserve_fd(memfd_with(b"o"), 1)
    r, _ = os.pipe()
    assert errno_of(session.preserve_fd, r, 1) == errno.EEXIST
    assert errno_of(session.preserve_fd, -1, 1) == errno.EEXIST
    assert errno_of(session.preserve_fd, -1, 2) == errno.EBADF
    assert errno_of(session.preserve_fd, r, 2) == errno.ENOENT


def test_unlinked_tmpfs_file_is_preserved(emulated_host):
    """memfd_luo_can_preserve: shmem_file(file) && !inode->i_nlink -- an
    O_TMPFILE file of a tmpfs too; with a name it has no handler."""
    session = LiveUpdate.open(emulated_host.host).create_session("tmpfile")
    try:
        tmp = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError as e:
        pytest.skip(f"no O_TMPFILE on /dev/shm here: {e}")
    session.preserve_fd(tmp, 1)
    path = f"/dev/shm/luvmm-test-linked-{os.getpid()}"
    linked = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        assert errno_of(session.preserve_fd, linked, 2) == errno.ENOENT
    finally:
        os.unlink(path)
    session.preserve_fd(linked, 2)


def test_get_session_name(emulated_host):
    session = LiveUpdate.open(emulated_host.host).create_session("get-name-test")
    assert session.get_name() == "get-name-test"


def test_get_session_name_max_length(emulated_host):
    name = "L" * 63
    session = LiveUpdate.open(emulated_host.host).create_session(name)
    assert session.get_name() == name


def test_preserve_many_sessions(emulated_host):
    luo = LiveUpdate.open(emulated_host.host)
    for i in range(32):
        luo.create_session(f"many-sessions-{i}").preserve_fd(memfd_with(b"x"), i)


def test_preserve_many_files(emulated_host):
    session = LiveUpdate.open(emulated_host.host).create_session("many-files")
    for i in range(60):
        session.preserve_fd(memfd_with(bytes([i]) * 100), 0x1000 + i)


# --- luo_kexec_simple.c / luo_multi_session.c: across a kexec ------------------------------------

def test_kexec_simple(emulated_host):
    host = emulated_host.host
    data = os.urandom(3 * 4096 + 123)
    mem = memfd_with(data)
    os.lseek(mem, 1000, os.SEEK_SET)
    luo = LiveUpdate.open(host)
    session = luo.create_session("kexec-simple")
    session.preserve_fd(mem, 0x1A)
    info = host.kexec()
    assert info["generation"] == 2 and info["kho_error"] is None
    luo = LiveUpdate.open(host)  # the old /dev/liveupdate fd died with the old kernel
    session = luo.retrieve_session("kexec-simple")
    fd = session.retrieve_fd(0x1A)
    assert os.pread(fd, len(data) + 10, 0) == data  # contents and size
    assert os.lseek(fd, 0, os.SEEK_CUR) == 1000  # position
    assert not os.get_inheritable(fd)  # O_CLOEXEC
    session.finish()
    # luo_session_finish empties the session but does not remove it: that is
    # luo_session_release's, at the close of its fd.  Until then it is still
    # retrieved (luo_session_retrieve: -EINVAL); after, gone (-ENOENT).
    assert errno_of(luo.retrieve_session, "kexec-simple") == errno.EINVAL
    assert errno_of(session.retrieve_fd, 0x1A) == errno.ENOENT  # luo_retrieve_file: the file set is empty
    session.close()
    assert errno_of(luo.retrieve_session, "kexec-simple") == errno.ENOENT


def test_kexec_multi_session(emulated_host):
    host = emulated_host.host
    luo = LiveUpdate.open(host)
    contents = {}
    for s in range(2):
        session = luo.create_session(f"multi-session-{s}")
        for t in range(3):
            data = os.urandom(5000 + 100 * t + s)
            session.preserve_fd(memfd_with(data), t)
            contents[s, t] = data
    host.kexec()
    luo = LiveUpdate.open(host)
    for s in range(2):
        session = luo.retrieve_session(f"multi-session-{s}")
        for t in range(3):
            assert os.pread(session.retrieve_fd(t), 10000, 0) == contents[s, t]
        session.finish()


# --- the other rules --------------------------------------------------------------------------------

def test_session_and_token_lookups(emulated_host):
    host = emulated_host.host
    luo = LiveUpdate.open(host)
    session = luo.create_session("rules")
    session.preserve_fd(memfd_with(b"r"), 1)
    assert errno_of(session.retrieve_fd, 1) == errno.EINVAL  # outgoing: no RETRIEVE_FD
    assert errno_of(session.finish) == errno.EINVAL  # outgoing: no FINISH
    assert errno_of(luo.retrieve_session, "rules") == errno.ENOENT  # nothing incoming yet
    host.kexec()
    luo = LiveUpdate.open(host)
    assert errno_of(luo.retrieve_session, "nope") == errno.ENOENT
    session = luo.retrieve_session("rules")
    assert errno_of(luo.retrieve_session, "rules") == errno.EINVAL  # twice
    assert errno_of(session.retrieve_fd, 2) == errno.ENOENT
    assert errno_of(session.preserve_fd, memfd_with(b"x"), 3) == errno.EINVAL  # incoming: no PRESERVE_FD
    # A new outgoing session may reuse the name.
    luo.create_session("rules")


def test_struct_size_rules(emulated_host):
    host = emulated_host.host
    luo = LiveUpdate.open(host)
    assert errno_of(_create_raw, host, luo.fd, b"short", 8) == errno.EINVAL  # below min size
    # Bigger than the kernel knows, with zeros past it: fine; with a non-zero byte: E2BIG.
    arg = bytearray(80)
    struct.pack_into("<Ii", arg, 0, 80, -1)
    arg[8:12] = b"big1"
    host.ioctl(luo.fd, LIVEUPDATE_IOCTL_CREATE_SESSION, arg)
    arg[8:12] = b"big2"
    arg[79] = 1
    assert errno_of(host.ioctl, luo.fd, LIVEUPDATE_IOCTL_CREATE_SESSION, arg) == errno.E2BIG
    session = luo.create_session("finish-reserved")
    host.kexec()
    session = LiveUpdate.open(host).retrieve_session("finish-reserved")
    finish = new_arg("struct liveupdate_session_finish", reserved=1)
    assert errno_of(host.ioctl, session.fd, LIVEUPDATE_SESSION_FINISH, ffi.buffer(finish)) == errno.EINVAL
    # A session ioctl number that is not one (wrong direction bits): ENOTTY.
    assert errno_of(host.ioctl, session.fd, LIVEUPDATE_SESSION_PRESERVE_FD | 1 << 30, bytearray(16)) \
        == errno.ENOTTY


def test_closing_a_session_unpreserves(emulated_host):
    host = emulated_host.host
    luo = LiveUpdate.open(host)
    kept, dropped = luo.create_session("kept"), luo.create_session("dropped")
    kept.preserve_fd(memfd_with(b"k"), 1)
    mem = memfd_with(b"d")
    dropped.preserve_fd(mem, 1)
    dropped.close()
    kept.preserve_fd(mem, 2)  # no longer preserved elsewhere
    host.kexec()
    luo = LiveUpdate.open(host)
    assert errno_of(luo.retrieve_session, "dropped") == errno.ENOENT
    assert os.pread(luo.retrieve_session("kept").retrieve_fd(2), 1, 0) == b"d"


def test_memfd_preserve_adds_no_seal_and_a_size_change_fails_the_reboot(emulated_host):
    """memfd_luo_preserve freezes the size with shmem_freeze (an inode flag,
    SHMEM_F_MAPPING_FROZEN), not a seal: the caller's seals do not change.  The
    emulated host cannot set that flag on the host's memfd (see
    liveupdate/emu/kernel/memfd.py), so ftruncate succeeds here -- and the
    size change is caught at the reboot instead: the freeze fails EBUSY and
    no kexec happens."""
    host = emulated_host.host
    session = LiveUpdate.open(host).create_session("frozen")
    mem = os.memfd_create("grow", os.MFD_ALLOW_SEALING)
    os.ftruncate(mem, 4096)
    session.preserve_fd(mem, 1)
    assert fcntl.fcntl(mem, fcntl.F_GET_SEALS) == 0
    os.ftruncate(mem, 8192)
    assert errno_of(host.kexec) == errno.EBUSY
    os.ftruncate(mem, 4096)
    assert host.kexec()["generation"] == 2


def test_memfd_with_every_known_seal_is_preserved(emulated_host):
    """MEMFD_LUO_ALL_SEALS is every seal Linux 7.2 defines, F_SEAL_EXEC included
    (the lab kernel takes it); a seal beyond those would be EOPNOTSUPP."""
    session = LiveUpdate.open(emulated_host.host).create_session("seals")
    mem = os.memfd_create("exec-sealed", os.MFD_ALLOW_SEALING)
    F_SEAL_EXEC = 0x20
    try:
        fcntl.fcntl(mem, fcntl.F_ADD_SEALS, F_SEAL_EXEC)
    except OSError:
        pytest.skip("this kernel has no F_SEAL_EXEC")
    session.preserve_fd(mem, 1)
    assert fcntl.fcntl(mem, fcntl.F_GET_SEALS) & F_SEAL_EXEC


def test_hugetlb_memfd_has_no_handler(emulated_host):
    try:
        mem = os.memfd_create("huge", os.MFD_HUGETLB)
        os.ftruncate(mem, 2 << 20)
    except OSError as e:
        pytest.skip(f"no hugetlb memfds here: {e}")
    session = LiveUpdate.open(emulated_host.host).create_session("huge")
    assert errno_of(session.preserve_fd, mem, 1) == errno.ENOENT


# --- rules of the next boot (kexec) ------------------------------------------------------------------

@pytest.mark.parametrize("emulated_host", [{"env": {"LUVMM_FAULTS": "finish=fail"}}], indirect=True)
def test_closing_a_retrieved_session_whose_finish_fails_leaves_it_retrieved(emulated_host):
    """luo_session_release: if luo_session_finish_one fails it returns before
    luo_session_remove -- the session stays in the incoming list, still
    retrieved, so RETRIEVE_SESSION of it is -EINVAL (luo_session_retrieve),
    not a second chance."""
    host = emulated_host.host
    LiveUpdate.open(host).create_session("unfinished").preserve_fd(memfd_with(b"u"), 1)
    host.kexec()
    luo = LiveUpdate.open(host)
    session = luo.retrieve_session("unfinished")
    assert errno_of(session.finish) == errno.EIO  # the injected fault
    session.close()
    assert errno_of(luo.retrieve_session, "unfinished") == errno.EINVAL
