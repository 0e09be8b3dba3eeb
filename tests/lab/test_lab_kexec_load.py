"""luvmm.liveupdate.kexec on the lab kernel (guest side: tests/lab/guest_kexec_load.py,
in the lab_devices boot): kexec_file_load through cffi loads the lab kernel,
and each way it can fail says why with the kernel's errno."""

import errno


def test_load_unload_and_refusals(lab_devices):
    got = lab_devices.json("kexec_load.json")
    assert got["load"] == 0 and got["loaded_after_load"] is True
    assert got["unload"] == 0 and got["loaded_after_unload"] is False
    assert got["missing"]["errno"] == errno.ENOENT and "/nonexistent/vmlinuz" in got["missing"]["message"]
    # kernel/kexec_file.c kimage_file_prepare_segments -> arch_kexec_kernel_image_probe: no loader takes it
    assert got["not_a_kernel"]["errno"] == errno.ENOEXEC and "not a kernel image" in got["not_a_kernel"]["message"]
    # fs/kernel_read_file.c: the file must not be open for writing (deny_write_access)
    assert got["open_for_writing"]["errno"] == errno.ETXTBSY and "open for writing" in got["open_for_writing"]["message"]
    assert got["loaded_at_end"] is False  # a refused load leaves nothing loaded
    assert "BOOT_IMAGE=" not in got["cmdline"] and "kho=on" in got["cmdline"]
