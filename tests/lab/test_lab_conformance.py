"""The conformance cases (luvmm/lab/conformance: luo, memfd, iommufd, vfio)
on a fresh emulated host and on the lab kernel -- `luvmm lab conformance
--json`, one boot -- and the provisional iommufd command number against the
lab kernel's headers.  Every case runs on both sides; nothing may differ but
what is declared (out of tree: what mainline does not have; not modelled:
what the emulated host cannot reproduce, each with its reason)."""

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
def test_the_emulated_kernel_conforms_to_the_lab_kernel(lab_kernel):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "luvmm", "lab", "conformance", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=800)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"no JSON report (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    broken = {r["case"]: (r["emulated"], r["real"]) for r in report["cases"]
              if "result" not in r["emulated"] or "result" not in r["real"]}
    assert not broken, f"cases that did not run on both sides: {json.dumps(broken)[:3000]}"
    assert report["summary"]["differ"] == [], json.dumps(
        [r for r in report["cases"] if r["case"] in report["summary"]["differ"]])[:3000]
    assert {r["case"].split(".")[0] for r in report["cases"]} == {"luo", "memfd", "iommufd", "vfio"}
    assert report["summary"]["cases"] >= 45
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
