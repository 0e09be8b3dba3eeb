"""In the lab: memfds across a real kexec (kexec_file_load + reboot(LINUX_REBOOT_CMD_KEXEC),
KHO, LUO) through luvmm's handles -- contents, size, seals, position, the
retrieved file's flags, the size freeze between PRESERVE_FD and the reboot,
and what RETRIEVE_FD and FINISH answer.  Guest side: tests/lab/guest_memfd.py."""

import errno
import fcntl
import os

import pytest

from tests.lab.guest_memfd import RAM_SIZE, SEALS, SMALL_POS, SMALL_SIZE

# include/uapi/asm-generic/fcntl.h (x86-64 uses it): the kernel's O_LARGEFILE,
# which F_GETFL reports; glibc's os.O_LARGEFILE is 0 on 64-bit.
KERNEL_O_LARGEFILE = 1 << 15


@pytest.fixture(scope="module")
def stages(lab_memfd):
    for n in (1, 2):
        error = lab_memfd.path(f"memfd-{n}-error.json")
        if os.path.exists(error):
            pytest.fail(f"stage {n} failed in the guest:\n{lab_memfd.json(f'memfd-{n}-error.json')['traceback']}")
    return lab_memfd.json("memfd-1.json"), lab_memfd.json("memfd-2.json")


def test_two_stages_one_real_kexec_into_the_lab_kernel(lab_memfd, lab_kernel, stages):
    result = lab_memfd.result
    assert result.status == 0
    assert [b["stage"] for b in result.boots] == [1, 2] and len(result.kexecs) == 1
    assert stages[0]["release"] == stages[1]["release"] == lab_kernel["kernelrelease"]
    assert len(result.kexec_round_trips()) == 1


def test_contents_and_size_survive_the_kexec(stages):
    _, after = stages
    assert after["ram_size"] == RAM_SIZE
    assert after["ram_first_differing_page_offset"] is None
    assert after["ram_equal"] and after["ram_sha256"] == after["ram_expected_sha256"]
    assert after["small_size"] == SMALL_SIZE and after["small_equal"]


def test_writes_after_preserve_fd_reach_the_next_kernel(stages):
    """LUO takes the contents at the reboot, not at PRESERVE_FD: the VMM
    preserves RAM as soon as the guest runs, and the guest runs on."""
    before, after = stages
    assert before["late_write"] == 4096
    assert after["ram_equal"]  # the expected image includes the late write


def test_seals_position_and_flags(stages):
    before, after = stages
    # mm/memfd_luo.c: seals are preserved and re-applied (a memfd made without
    # MFD_ALLOW_SEALING has F_SEAL_SEAL, and keeps it); the position is kept;
    # memfds are always O_RDWR | O_LARGEFILE.
    assert after["ram_seals"] == SEALS
    assert after["small_seals"] == before["small_seals_before"] == fcntl.F_SEAL_SEAL
    assert after["small_position"] == SMALL_POS
    assert after["ram_flags"] & os.O_ACCMODE == os.O_RDWR and after["ram_flags"] & KERNEL_O_LARGEFILE
    # kernel/liveupdate/luo_session.c: RETRIEVE_FD installs the fd with
    # get_unused_fd_flags(O_CLOEXEC) (memfd_luo's FD_CLOEXEC note is about the
    # memfd's own flag, which is not carried over); sessions too (luo_core.c).
    assert after["ram_cloexec"] and after["small_cloexec"] and after["session_cloexec"]


def test_the_size_is_frozen_between_preserve_fd_and_the_reboot(stages):
    """mm/memfd_luo.c memfd_luo_preserve: shmem_freeze(); mm/shmem.c then
    refuses a size change (shmem_setattr), a write past the end
    (shmem_write_begin) and fallocate with -EPERM."""
    before, _ = stages
    assert before["ftruncate_grow_errno"] == errno.EPERM
    assert before["ftruncate_shrink_errno"] == errno.EPERM
    assert before["write_past_end_errno"] == errno.EPERM
    assert before["fallocate_errno"] == errno.EPERM
    assert before["size_after_attempts"] == SMALL_SIZE


def test_luo_rules_before_the_kexec(stages):
    before, _ = stages
    assert before["seals_before"] == SEALS
    # kernel/liveupdate/luo_file.c luo_preserve_file: the same file in a second
    # place is -EBUSY (luo_preserved_files), a token used twice -EEXIST.
    assert before["preserve_again_errno"] == errno.EBUSY
    assert before["token_reused_errno"] == errno.EEXIST
    # kernel/liveupdate/luo_core.c luo_open: one opener at a time
    assert before["second_open_errno"] == errno.EBUSY


def test_retrieve_and_finish_after_the_kexec(stages):
    _, after = stages
    assert after["session_name"] == "luvmm-lab-memfd"
    # luo_retrieve_file: an unknown token -ENOENT; a token retrieved again hands out the same file
    assert after["unknown_token_errno"] == errno.ENOENT
    assert after["retrieved_again_same_file"]
    assert after["retrieve_unknown_session_errno"] == errno.ENOENT
    # luo_session.c luo_session_retrieve: a session already retrieved is -EINVAL
    assert after["retrieve_session_twice_errno"] == errno.EINVAL
    assert after["finish"] == 0
    assert after["ram_still_readable_after_finish"]
    # luo_session_finish empties the session (luo_file_finish) but leaves it in
    # the incoming list, retrieved, until its fd is closed: RETRIEVE_SESSION
    # -EINVAL, RETRIEVE_FD -ENOENT (luo_retrieve_file: the file set is empty)...
    assert after["retrieve_session_after_finish_before_close_errno"] == errno.EINVAL
    assert after["retrieve_fd_after_finish_errno"] == errno.ENOENT
    # ... and luo_session_release removes it: gone.
    assert after["retrieve_after_finish_errno"] == errno.ENOENT


def test_the_retrieved_memfd_is_an_ordinary_memfd(stages):
    """mm/memfd_luo.c memfd_luo_retrieve allocates a new memfd and fills it: its
    size is not frozen (the freeze was the old kernel's, on the old file)."""
    _, after = stages
    assert after["small_ftruncate_retrieved_errno"] == 0
    assert after["small_size_after_ftruncate"] == SMALL_SIZE + 4096
