"""The kernel ABI layer: ioctl numbers and struct layouts against the kernel's headers."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from luvmm import abi
from luvmm.uapi.table import provisional, uapi_values

HERE = Path(__file__).parent / "uapi"


def test_known_kernel_values():
    values = uapi_values()
    # Values read from the kernel's headers (and quoted in the issue).
    assert values["IOMMU_IOAS_MAP"] == 0x3B85 == 15237
    assert values["sizeof(struct iommu_ioas_map)"] == 40
    assert values["VFIO_DEVICE_BIND_IOMMUFD"] == 0x3B76
    assert values["KVM_SET_USER_MEMORY_REGION"] == 0x4020AE46
    assert values["LIVEUPDATE_SESSION_PRESERVE_FD"] == 0xBA40
    assert values["sizeof(struct kvm_run)"] == 2352
    assert values["KVM_RUN"] == 0xAE80
    assert values["KVM_GET_SREGS"] == 0x8138AE83
    assert values["sizeof(struct liveupdate_ioctl_create_session)"] == 72
    assert values["sizeof(struct vfio_irq_set)"] == 20
    assert values["IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE"] == 0x3BC0  # provisional: luvmm/uapi/iommufd.py


def test_every_item_of_the_issue_is_listed():
    values = uapi_values()
    ioctls = """KVM_GET_API_VERSION KVM_CREATE_VM KVM_GET_VCPU_MMAP_SIZE KVM_CREATE_VCPU
        KVM_SET_USER_MEMORY_REGION KVM_RUN KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS
        KVM_IRQFD KVM_IOEVENTFD KVM_CREATE_IRQCHIP VFIO_DEVICE_GET_INFO VFIO_DEVICE_GET_REGION_INFO
        VFIO_DEVICE_GET_IRQ_INFO VFIO_DEVICE_SET_IRQS VFIO_DEVICE_RESET VFIO_DEVICE_BIND_IOMMUFD
        VFIO_DEVICE_ATTACH_IOMMUFD_PT VFIO_DEVICE_DETACH_IOMMUFD_PT IOMMU_DESTROY IOMMU_IOAS_ALLOC
        IOMMU_IOAS_MAP IOMMU_IOAS_MAP_FILE IOMMU_IOAS_UNMAP IOMMU_HWPT_ALLOC IOMMU_GET_HW_INFO
        IOMMU_IOAS_IOVA_RANGES IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE LIVEUPDATE_IOCTL_CREATE_SESSION
        LIVEUPDATE_IOCTL_RETRIEVE_SESSION LIVEUPDATE_SESSION_PRESERVE_FD LIVEUPDATE_SESSION_RETRIEVE_FD
        LIVEUPDATE_SESSION_FINISH""".split()
    structs = """kvm_userspace_memory_region kvm_run kvm_regs kvm_sregs kvm_irqfd kvm_ioeventfd
        vfio_device_info vfio_region_info vfio_irq_info vfio_irq_set vfio_device_bind_iommufd
        vfio_device_attach_iommufd_pt vfio_device_detach_iommufd_pt iommu_destroy iommu_ioas_alloc
        iommu_ioas_map iommu_ioas_map_file iommu_ioas_unmap iommu_hwpt_alloc
        liveupdate_ioctl_create_session liveupdate_ioctl_retrieve_session
        liveupdate_session_preserve_fd liveupdate_session_retrieve_fd liveupdate_session_finish""".split()
    missing = [n for n in ioctls if n not in values]
    missing += [s for s in structs if f"sizeof(struct {s})" not in values]
    assert not missing


def test_matches_linux_7_2_headers():
    """linux-7.2.json is uapi_ref.c's output against the uAPI headers of Linux 7.2 (those of Debian's
    linux-source-7.2 7.2.13, which `luvmm lab build` installs)."""
    ref = json.loads((HERE / "linux-7.2.json").read_text())
    values = uapi_values()
    assert {k: values.get(k) for k in ref} == ref
    # Everything luvmm lists is in those headers, except the provisional uAPI.
    assert set(values) - set(ref) == provisional()


def _system_header_values():
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to read the system's kernel headers with")
    if not os.path.exists("/usr/include/linux/kvm.h"):
        pytest.skip("no kernel uAPI headers in /usr/include (install linux-libc-dev)")
    return cc


def test_matches_this_systems_headers(tmp_path):
    """Whatever subset the installed headers define must agree with luvmm.

    Older headers may have a shorter version of an extensible struct (one that
    starts with size/argsz: the kernel only ever appends fields to those, e.g.
    vfio_device_info gained ``pad`` after 6.1); luvmm's may be longer, never
    shorter.  Everything else must be equal.
    """
    cc = _system_header_values()
    exe = tmp_path / "uapi_ref"
    subprocess.run([cc, "-o", str(exe), str(HERE / "uapi_ref.c")], check=True)
    ref = json.loads(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)
    assert ref, "the system headers defined nothing"
    values = uapi_values()
    extensible = {f"sizeof({d.argtype})" for d in abi.IOCTLS.values() if d.sized}
    for key, value in ref.items():
        if key in extensible:
            assert values[key] >= value, key
        else:
            assert values.get(key) == value, key


def test_cli_json_is_the_table():
    out = subprocess.run([sys.executable, "-m", "luvmm", "uapi", "--json"], check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out) == uapi_values()


def test_cli_table_is_readable():
    out = subprocess.run([sys.executable, "-m", "luvmm", "uapi"], check=True,
                         capture_output=True, text=True).stdout
    assert "VFIO_DEVICE_BIND_IOMMUFD" in out and "0x3b76" in out
    assert "struct kvm_run" in out and "2352" in out
    assert "(provisional)" in out


@given(dir=st.integers(0, 3), type_=st.integers(0, 255), nr=st.integers(0, 255),
       size=st.integers(0, (1 << 14) - 1))
def test_ioc_encoding_roundtrips(dir, type_, nr, size):
    request = abi._IOC(dir, type_, nr, size)
    assert (abi._IOC_DIR(request), abi._IOC_TYPE(request), abi._IOC_NR(request),
            abi._IOC_SIZE(request)) == (dir, type_, nr, size)
    assert 0 <= request < 1 << 32


def test_ioc_rejects_out_of_range_fields():
    with pytest.raises(ValueError):
        abi._IOC(0, 0x100, 0, 0)
    with pytest.raises(ValueError):
        abi._IOW(0xAE, 0, "uint8_t[16384]")


def test_ioc_size_comes_from_the_struct():
    from luvmm.uapi.kvm import KVM_GET_REGS

    assert abi._IOC_SIZE(KVM_GET_REGS) == abi.ffi.sizeof("struct kvm_regs") == 144
    assert abi._IOC_DIR(KVM_GET_REGS) == abi._IOC_READ
    assert abi.IOCTLS[KVM_GET_REGS].argtype == "struct kvm_regs"


def test_registry_refuses_collisions_and_mismatched_argument_types():
    from luvmm.uapi.kvm import KVMIO

    with pytest.raises(ValueError, match="collides"):
        abi.ioctl("NOT_KVM_RUN", abi._IO(KVMIO, 0x80))
    with pytest.raises(ValueError, match="does not match"):
        abi.ioctl("BAD", abi._IOR(KVMIO, 0xF0, "struct kvm_regs"), "struct kvm_sregs")
    assert "BAD" not in abi.IOCTLS_BY_NAME


def test_extensible_structs_are_marked_sized():
    sized = {d.name for d in abi.IOCTLS.values() if d.sized}
    assert "IOMMU_IOAS_MAP" in sized and "VFIO_DEVICE_GET_INFO" in sized
    assert "LIVEUPDATE_SESSION_FINISH" in sized
    assert "KVM_GET_REGS" not in sized
