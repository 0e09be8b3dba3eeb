"""The committed guest firmware image is what its source builds, and the
machine-state blob refuses what it cannot trust."""

import os
import shutil
import subprocess

import pytest

from vmm import machine_state

FW = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vmm", "firmware")


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
    state = {"config": {"name": "x"}, "vcpus": [{"id": 0, "regs": "00" * 144}], "phases": {"stopped": 1.5}}
    blob = machine_state.encode(state)
    assert machine_state.decode(blob + bytes(100)) == state  # the memfd is bigger than the blob
    for bad, why in ((blob[:10], "shorter"), (b"X" + blob[1:], "magic"), (blob[:-1], "truncated"),
                     (blob[:30] + bytes([blob[30] ^ 1]) + blob[31:], "checksum")):
        with pytest.raises(machine_state.StateError, match=why):
            machine_state.decode(bad)
    wrong_version = blob[:8] + (2).to_bytes(4, "little") + blob[12:]
    with pytest.raises(machine_state.StateError, match="version"):
        machine_state.decode(wrong_version)
