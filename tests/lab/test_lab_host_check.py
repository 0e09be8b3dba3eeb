"""`luvmm host check --host real` in the lab (the lab_devices boot): a
mainline kernel preserves memfds but not a VFIO cdev nor an iommufd, and has
no HWPT-preserve ioctl -- so a live update keeps the VM (RAM and machine
state) and resets its device; exit status 4 says so."""

import json

from luvmm import exitcodes


def _check(lab_devices):
    rc = int(lab_devices.text("check.rc").strip())
    out = lab_devices.text("check.out")
    return rc, json.loads(out[out.index("{"):])


def test_host_check_on_mainline_finds_luo_kho_memfd_and_no_device_preservation(lab_devices):
    rc, result = _check(lab_devices)
    found = {f["name"]: f for f in result["findings"]}
    assert result["host"] == "real"
    for present in ("liveupdate", "kho", "memfd", "kexec_file_load", "iommu", "device"):
        assert found[present]["present"] is True, found[present]
    for absent in ("vfio", "iommufd", "hwpt"):
        assert found[absent]["present"] is False and "reset" in found[absent]["consequence"], found[absent]
    assert result["probe"] == {"memfd": "0", "vfio": "ENOENT", "iommufd": "ENOENT", "hwpt": "ENOTTY"}
    assert found["device"]["detail"].startswith(result["device"]) and "vfio-pci" in found["device"]["detail"]
    assert result["vm_survives"] and not result["dma_continuity"]
    assert rc == exitcodes.DEVICE_RESET
