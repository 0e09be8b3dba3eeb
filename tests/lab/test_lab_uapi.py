"""`luvmm uapi` against the lab kernel's own uAPI headers (installed by `luvmm
lab build` from the same tree): every ioctl number and struct size luvmm
speaks is the kernel's, except the provisional (out-of-tree) uAPI."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from luvmm.uapi.table import provisional, uapi_values

REF = Path(__file__).parent.parent / "unit" / "uapi" / "uapi_ref.c"


def test_luvmm_uapi_is_the_lab_kernels(lab_kernel, tmp_path):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "uapi_ref"
    subprocess.run([cc, "-isystem", lab_kernel["headers"], "-o", str(exe), str(REF)], check=True)
    ref = json.loads(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)
    values = uapi_values()
    assert {k: values.get(k) for k in ref} == ref
    assert set(values) - set(ref) == provisional()
