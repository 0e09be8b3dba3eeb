"""The committed guest firmware image is what its source builds, and the
machine-state blob refuses what it cannot trust."""

import os
import shutil
import subprocess

import pytest

from luvmm.vmm import machine_state
from tests.support.machine_state import sample_state as _state

FW = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "vmm", "firmware")


def test_firmware_image_matches_its_source(tmp_path):
    if shutil.which("gcc") is None or shutil.which("objcopy") is None or shutil.which("make") is None:
        pytest.skip("needs gcc, objcopy and make to rebuild the firmware")
    recorded = open(os.path.join(FW, "fw.bin.toolchain")).read().strip()
    here = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[0].strip()
    if here != recorded:
        pytest.skip(f"fw.bin was built with {recorded!r}; this machine has {here!r}")
    for name in ("fw.c", "mailbox.h", "fw.ld", "Makefile"):
        shutil.copy(os.path.join(FW, name), tmp_path / name)
    subprocess.run(["make", "-s", "-C", str(tmp_path)], check=True, capture_output=True)
    assert (tmp_path / "fw.bin").read_bytes() == open(os.path.join(FW, "fw.bin"), "rb").read()


def test_machine_state_round_trip_and_refusals():
    blob = machine_state.encode(_state())
    back = machine_state.decode(blob + bytes(100))  # the memfd is bigger than the blob
    assert back.to_dict() == _state().to_dict()
    assert back.vcpus[0].sregs == bytes(312) and back.device.dev_id == 2 and back.timestamps.inflight_at_pause == {
        "3": 12}
    for bad, why in ((blob[:10], "shorter"), (b"X" + blob[1:], "magic"), (blob[:-1], "truncated"),
                     (blob[:30] + bytes([blob[30] ^ 1]) + blob[31:], "checksum")):
        with pytest.raises(machine_state.StateError, match=why):
            machine_state.decode(bad)
    wrong_version = blob[:8] + (3).to_bytes(4, "little") + blob[12:]
    with pytest.raises(machine_state.StateError, match="version 3; this VMM reads versions 1, 2"):
        machine_state.decode(wrong_version)


def test_a_section_without_its_fields_is_refused():
    import json
    import zlib

    body = _state().to_dict()
    del body["device"]["bdf"]
    raw = json.dumps(body).encode()
    blob = machine_state.HEADER.pack(machine_state.MAGIC, 2, zlib.crc32(raw), len(raw)) + raw
    with pytest.raises(machine_state.StateError, match="section device: 'bdf' missing"):
        machine_state.decode(blob)


def test_a_version_1_blob_is_read_into_the_sections():
    """The previous layout, as the VMM of the last release wrote it: a live
    update that installs this luvmm restores VMs that an older one prepared."""
    import json
    import zlib

    v1 = {"config": {"name": "old", "memory": 64 << 20}, "vcpus": [{"id": 0, "regs": "00" * 144, "sregs": "11" * 312}],
          "portal": {"0": ["00" * 64, 255, 0x4000]}, "device": {"bdf": "0000:6a:01.0", "ioas": 1, "hwpt": 3,
                                                                 "msix": True},
          "phases": {"stopped": 2.0, "mailbox_at_pause": {"heartbeat": 5}, "inflight_at_pause": {"1": 9}},
          "mailbox": {"heartbeat": 5}, "interrupts": 4}
    raw = json.dumps(v1).encode()
    state = machine_state.decode(machine_state.HEADER.pack(machine_state.MAGIC, 1, zlib.crc32(raw), len(raw)) + raw)
    assert state.guest.config["name"] == "old" and state.memory.size == 64 << 20
    assert state.vcpus[0].sregs == b"\x11" * 312 and state.device.hwpt == 3 and state.device.msix_armed
    assert state.timestamps.marks == {"stopped": 2.0} and state.timestamps.mailbox_at_pause == {"heartbeat": 5}
    assert state.timestamps.inflight_at_pause == {"1": 9} and state.guest.portal_buffers()[0][1] == 255


def test_a_vcpus_cpuid_is_kept_and_a_blob_without_one_still_restores():
    """The guest goes on seeing the CPU it booted on (the CPUID it was given,
    not what the new kernel's KVM supports); a version-2 blob written before
    the field existed decodes with none, and the restore asks KVM."""
    state = _state()
    cpuid = bytes(range(256)) * 3
    state.vcpus[0].cpuid = cpuid
    assert machine_state.decode(machine_state.encode(state)).vcpus[0].cpuid == cpuid
    assert machine_state.decode(machine_state.encode(_state())).vcpus[0].cpuid == b""
