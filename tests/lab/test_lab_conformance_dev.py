"""The iommufd and VFIO conformance cases against the lab kernel, and the
provisional iommufd command number against the lab kernel's headers.

`luvmm lab conformance --area iommufd --area vfio` runs every case of
luvmm/lab/conformance/{iommufd,vfio}.py on a fresh emulated host and on the
real kernel in the lab guest; nothing may differ but what is declared.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from luvmm.abi import _IOC_NR
from luvmm.uapi.iommufd import (
    IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE,
    IOMMUFD_CMD_BASE,
    IOMMUFD_CMD_HWPT_LIVEUPDATE_MARK_PRESERVE,
)

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.mark.timeout(900)
def test_iommufd_and_vfio_conform_to_the_lab_kernel(lab_kernel):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "luvmm", "lab", "conformance", "--area", "iommufd",
                           "--area", "vfio", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"no JSON report (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    errored = [(row["case"], side, row[side]["error"]) for row in report["cases"]
               for side in ("emulated", "real") if "error" in row[side]]
    assert errored == []
    assert report["summary"]["differ"] == [], [r for r in report["cases"] if r["case"] in report["summary"]["differ"]]
    assert report["summary"]["skipped"] == 0
    assert proc.returncode == 0, proc.stderr[-3000:]


def _iommufd_commands(header: str) -> dict[str, int]:
    """The IOMMUFD_CMD_* enumerators of a linux/iommufd.h, by value (every one
    is given explicitly since 6.x, but an implicit one follows its predecessor)."""
    enum = re.search(r"enum\s*{\s*(IOMMUFD_CMD_BASE[^}]*)}", header).group(1)
    out, last = {}, None
    for name, value in re.findall(r"(IOMMUFD_CMD_\w+)\s*(?:=\s*(\w+))?\s*,?", enum):
        if value:
            last = out[value] if value in out else int(value, 0)
        else:
            last = last + 1
        out[name] = last
    return out


def test_no_released_iommufd_command_has_the_provisional_number(lab_kernel):
    """The provisional IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE number is no
    command of the lab kernel's linux/iommufd.h, and sits above all of them
    (mainline allocates upward from IOMMUFD_CMD_BASE)."""
    header = (Path(lab_kernel["headers"]) / "linux" / "iommufd.h").read_text()
    commands = _iommufd_commands(header)
    assert commands["IOMMUFD_CMD_BASE"] == IOMMUFD_CMD_BASE
    assert len(commands) > 10  # the parse found the enum
    nr = _IOC_NR(IOMMU_HWPT_LIVEUPDATE_MARK_PRESERVE)
    assert nr == IOMMUFD_CMD_HWPT_LIVEUPDATE_MARK_PRESERVE
    assert nr not in commands.values()
    assert nr > max(commands.values())
    assert f"{nr:#x}" not in header.lower() and f"{nr:#04x}" not in header.lower()
