"""Bad input to the emulated host: malformed messages, unknown requests, wrong
sizes, bogus fds, a garbage KHO image.  Each gets the kernel's errno or a clear
error, and the daemon keeps serving its other clients."""

import errno
import os
import struct
import threading

import pytest

from luvmm.liveupdate.emu.client import connect
from luvmm.wire import REQUEST, OP_IOCTL, OP_PREAD, OP_PWRITE
from luvmm.liveupdate.emu.kernel.kho import KhoError, decode_image, encode_image
from luvmm.liveupdate.luo import LiveUpdate
from luvmm.uapi.luo import LIVEUPDATE_IOCTL_CREATE_SESSION
from luvmm.devices.iommufd import IommuFd
from tests.support.raw import raw_control, raw_file


def test_malformed_control_messages(emulated_host):
    state = emulated_host.state
    for bad in (b"\xff\xfe garbage", b"[1, 2]", b'{"op": "no-such-op"}', b'{"path": "/dev/iommu"}',
                b'{"op": "open", "path": 7}', b'{"op": "open"}', b"{}"):
        reply = raw_control(state, bad)
        assert b'"errno"' in reply, bad
    too_many = [os.eventfd(0) for _ in range(80)]
    assert b'"errno"' in raw_control(state, b'{"op": "hello"}', too_many)
    # Still serving.
    assert b'"pid"' in raw_control(state, b'{"op": "hello"}')


def test_malformed_file_messages(emulated_host):
    host = emulated_host.host
    luo = host.open("/dev/liveupdate")
    assert raw_file(luo, b"\x01\x02\x03") == (-1, errno.EINVAL)  # shorter than a header
    assert raw_file(luo, REQUEST.pack(99, 0, 0, 7)) == (-1, errno.EINVAL)  # unknown operation
    # The header says 72 bytes of struct, the message carries 10.
    assert raw_file(luo, REQUEST.pack(OP_IOCTL, LIVEUPDATE_IOCTL_CREATE_SESSION, 72, 7) + bytes(10)) \
        == (-1, errno.EFAULT)
    assert raw_file(luo, REQUEST.pack(OP_IOCTL, 0xBA07, 0, 7)) == (-1, errno.EINVAL)  # not a LUO command
    assert raw_file(luo, REQUEST.pack(OP_IOCTL, 0x12345678, 0, 7)) == (-1, errno.EINVAL)
    assert raw_file(luo, REQUEST.pack(OP_PREAD, 1 << 20, 0, 7)) == (-1, errno.EINVAL)
    assert raw_file(luo, REQUEST.pack(OP_PWRITE, 100, 0, 7) + b"short") == (-1, errno.EINVAL)
    # The same file still works.
    LiveUpdate(host, luo).create_session("still-serving")


def test_ioctl_on_the_wrong_file(emulated_host):
    host = emulated_host.host
    iommufd = IommuFd.open(host)
    arg = bytearray(72)
    struct.pack_into("<I", arg, 0, 72)
    arg[8:12] = b"oops"
    with pytest.raises(OSError) as e:
        host.ioctl(iommufd.fd, LIVEUPDATE_IOCTL_CREATE_SESSION, arg)
    assert e.value.errno == errno.ENOTTY


def test_many_clients_one_misbehaving(emulated_host):
    state = emulated_host.state
    errors = []

    def good(i):
        try:
            host = connect(state.socket)
            iommufd = IommuFd.open(host)
            for _ in range(50):
                ioas = iommufd.ioas_alloc()
                iommufd.destroy(ioas)
            host.close_connection()
        except Exception as e:  # collected and asserted below
            errors.append(e)

    def bad():
        for i in range(200):
            try:
                raw_control(state, os.urandom(64 + i))
            except OSError as e:
                errors.append(e)

    threads = [threading.Thread(target=good, args=(i,)) for i in range(4)] + [threading.Thread(target=bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert b'"pid"' in raw_control(state, b'{"op": "hello"}')


@pytest.mark.parametrize("emulated_host, why", [({"env": {"LUVMM_FAULTS": "kho=corrupt"}}, "checksum"),
                                                ({"env": {"LUVMM_FAULTS": "kho=truncate"}}, "truncated")],
                         indirect=["emulated_host"])
def test_garbage_kho_image_is_refused(emulated_host, why):
    """kho_populate: a handover FDT that is not valid is dropped ("disabling
    KHO revival"): the new kernel boots clean, with nothing incoming."""
    host = emulated_host.host
    luo = LiveUpdate.open(host)
    mem = os.memfd_create("doomed")
    os.write(mem, b"x" * 100)
    luo.create_session("doomed").preserve_fd(mem, 1)
    info = host.kexec()
    assert why in info["kho_error"]
    status = host.call({"op": "status"})[0]
    assert status["last_kho_error"] == info["kho_error"] and status["kexec_count"] == 1
    assert status["kernel"]["generation"] == 2  # booted, clean
    with pytest.raises(OSError) as e:
        LiveUpdate.open(host).retrieve_session("doomed")
    assert e.value.errno == errno.ENOENT  # the new kernel trusted nothing of it


@pytest.mark.parametrize("emulated_host", [{"env": {"LUVMM_FAULTS": "kho=skew"}}], indirect=True)
def test_an_incompatible_luo_tree_halts_the_machine(emulated_host):
    """A well-formed image whose LUO tree is another ABI's: luo_early_startup
    fails and luo_restore_fail() panics the new kernel.  The emulated machine
    halts with the message (status "panic"); it never boots clean."""
    host = emulated_host.host
    mem = os.memfd_create("doomed")
    LiveUpdate.open(host).create_session("doomed").preserve_fd(mem, 1)
    info = host.kexec()
    assert "incompatible" in info["panic"] and "failed to initialize" in info["panic"]
    status = host.call({"op": "status"})[0]
    assert status["panic"] == info["panic"]
    with pytest.raises(OSError) as e:
        LiveUpdate.open(host)
    assert e.value.errno == errno.EIO and "halted" in str(e.value)
    with pytest.raises(OSError) as e:
        host.kexec()
    assert e.value.errno == errno.EIO


def test_kho_decoder_refuses_garbage():
    good = encode_image({"compatible": "luvmm,kho-v1", "luo": {"sessions": [{"name": "a", "files": []}]}})
    assert decode_image(good)["luo"]["sessions"][0]["name"] == "a"
    for bad in (b"", b"LUVMMKHO", good[:-1], good[:20] + b"\0" * (len(good) - 20), b"X" + good[1:]):
        with pytest.raises(KhoError):
            decode_image(bad)
