"""The next boot's LUO rules, on the emulated kernel itself (no daemon): how
it takes the incoming LUO tree (luo_core.c luo_early_startup, luo_open;
luo_session.c luo_session_deserialize; luo_file.c luo_file_deserialize_one).
They need a tree the previous kernel would not write, so they are not run in
the lab (tests/lab/guest_luo_rules.py runs test_luo_selftests.py's)."""

import errno
import os

import pytest


def _booted():
    from luvmm.liveupdate.emu.kernel.core import Kernel
    from luvmm.liveupdate.emu.machine import Machine

    machine = Machine(1)
    kernel = Kernel(machine, profile="continuous-dma", generation=2, spawn=lambda file: None)
    return machine, kernel


def test_an_incoming_file_without_a_handler_makes_dev_liveupdate_eio():
    """luo_file_deserialize_one: no handler for the compatible is -ENOENT, so
    luo_session_deserialize fails, and luo_open returns -EIO ("Always return
    -EIO to user if deserialization fail") for the whole boot."""
    from luvmm.liveupdate.emu.kernel.core import KernelError
    from luvmm.liveupdate.emu.kernel.luo import LUO_COMPATIBLE

    machine, kernel = _booted()
    try:
        kernel.restore({"luo": {"compatible": LUO_COMPATIBLE, "sessions": [
            {"name": "s", "files": [{"token": 1, "compatible": "no-such-handler-v1", "data": {}}]}]}})
        for _ in range(2):
            with pytest.raises(KernelError) as e:
                kernel.open("/dev/liveupdate", os.O_RDWR)
            assert e.value.errno == errno.EIO
    finally:
        kernel.drop()
        machine.shutdown()


def test_an_incoming_session_name_twice_makes_dev_liveupdate_eio():
    """luo_session_deserialize_one: luo_session_insert -EEXIST fails the
    deserialization: luo_open is -EIO."""
    from luvmm.liveupdate.emu.kernel.core import KernelError
    from luvmm.liveupdate.emu.kernel.luo import LUO_COMPATIBLE

    machine, kernel = _booted()
    try:
        kernel.restore({"luo": {"compatible": LUO_COMPATIBLE, "sessions": [
            {"name": "twice", "files": []}, {"name": "twice", "files": []}]}})
        with pytest.raises(KernelError) as e:
            kernel.open("/dev/liveupdate", os.O_RDWR)
        assert e.value.errno == errno.EIO
    finally:
        kernel.drop()
        machine.shutdown()


@pytest.mark.parametrize("luo", [{"compatible": "luo-v0", "sessions": []},
                                 {"sessions": []},
                                 {"compatible": "luvmm,luo-v1", "sessions": [{"name": "s", "files": {"v": 2}}]}])
def test_an_incompatible_luo_tree_panics_the_kernel(luo):
    """luo_early_startup: a LUO state of another ABI ("LUO state is
    incompatible with ...") fails, and liveupdate_early_init calls
    luo_restore_fail(), which is panic() -- never a clean boot."""
    from luvmm.liveupdate.emu.kernel.core import KernelPanic

    machine, kernel = _booted()
    try:
        with pytest.raises(KernelPanic, match="incompatible"):
            kernel.restore({"luo": luo})
    finally:
        kernel.drop()
        machine.shutdown()


def test_a_session_closed_before_the_reboot_is_not_frozen():
    """Closing a session's last fd releases it before close() returns
    (luo_session_release: its files are unpreserved), so a reboot right
    after hands none of it over.  The emulated kernel hears of a close when
    the file's task runs -- here never (no daemon) -- and its freeze must ask
    first: `vm stop` letting go of a VM's session just before an update's
    kexec put the session in the next kernel, held for a VM no longer defined."""
    from luvmm.liveupdate.emu.kernel.luo import SessionFile

    machine, kernel = _booted()
    try:
        fds = {}
        for name in ("kept", "closed"):
            session = kernel.luo.create(name)
            session.file = SessionFile(kernel, session)
            fds[name] = kernel.install(session.file)
        os.close(fds.pop("closed"))
        assert [s["name"] for s in kernel.freeze()["luo"]["sessions"]] == ["kept"]
        assert [s.name for s in kernel.luo.outgoing.values()] == ["kept"]
        os.close(fds.pop("kept"))
    finally:
        kernel.drop()
        machine.shutdown()
