"""The lab's fixtures: the built lab kernel, and one boot per group of checks,
shared by the tests of the group (session scope), so that the suite boots
the guest a few times, not once per test."""

from __future__ import annotations

import json
import os
import shlex
import sys

import pytest

from luvmm.lab import ROOT


def pytest_collection_modifyitems(items):
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.lab)
            # A test's time includes the boot its fixture makes (the devices boot
            # takes minutes under TCG); each boot is bounded by its own timeout.
            if not item.get_closest_marker("timeout"):
                item.add_marker(pytest.mark.timeout(900))


@pytest.fixture(scope="session")
def lab_kernel():
    from luvmm.lab.build import find

    manifest = find()
    if manifest is None:
        pytest.skip("no lab kernel: run `luvmm lab build` (the lab tests boot it under QEMU)")
    return manifest


class LabRun:
    """A finished lab run and its shared directory."""

    def __init__(self, result, shared: str):
        self.result, self.shared = result, shared

    def path(self, name: str) -> str:
        return os.path.join(self.shared, name)

    def json(self, name: str):
        path = self.path(name)
        if not os.path.exists(path):
            pytest.fail(f"the guest wrote no {name}; guest output:\n{self.result.stdout[-3000:]}\n"
                        f"{self.result.stderr[-3000:]}")
        with open(path) as f:
            return json.load(f)

    def text(self, name: str) -> str:
        with open(self.path(name)) as f:
            return f.read()


def lab_run(manifest: dict, shared, cmd, timeout: float = 600, **kw) -> LabRun:
    from luvmm.lab.run import run

    result = run(cmd, manifest, results=str(shared), cwd=ROOT, timeout=timeout, **kw)
    if result.timed_out:
        pytest.fail(f"the lab run timed out after {timeout} s in stage {result.stages}:\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return LabRun(result, str(shared))


PY = shlex.quote(sys.executable)


def precompile(unit_prefix: str) -> None:
    """Compile luvmm's modules here, before the guest runs them: under TCG a
    guest compiles at a hundredth of the speed, and the commands (which
    write no bytecode in the lab) and the units (whose bytecode goes to the
    state dir's pycache) would spend minutes on it.  Into the tree's
    __pycache__ and into ``unit_prefix``, where the guest's units look."""
    import subprocess

    dirs = [os.path.join(ROOT, d) for d in ("luvmm", "vmm", "liveupdate", "devices", "metrics", "tests")]
    for prefix in (None, unit_prefix):
        env = dict(os.environ, **({"PYTHONPYCACHEPREFIX": prefix} if prefix else {}))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        subprocess.run([sys.executable, "-m", "compileall", "-q", *dirs], env=env, check=True,
                       stdout=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def lab_devices(lab_kernel, tmp_path_factory):
    """One boot for four groups of checks: VFIO/iommufd/edu and LUO facts
    (guest_devices.py), tests/unit/test_kvm.py and test_firmware_edu.py under
    pytest on the guest's own standard (nested) KVM, recorded as JUnit XML (pytest's plugins are not
    loaded: they need none, and importing them costs half a minute under
    TCG), the emulated kernel's LUO rules on the real one (guest_luo_rules.py)
    the firmware guest (guest_firmware.py) and `luvmm host check --host real`."""
    shared = tmp_path_factory.mktemp("lab-devices")

    def step(name: str, cmd: str) -> str:
        out, rc = shlex.quote(str(shared / f"{name}.out")), shlex.quote(str(shared / f"{name}.rc"))
        return f"{cmd} > {out} 2>&1; echo $? > {rc}"

    junit = shlex.quote(str(shared / "kvm.xml"))
    cmd = "; ".join([
        step("devices", f"{PY} -m tests.lab.guest_devices"),
        step("kvm", f"PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 {PY} -m pytest -q -p no:cacheprovider -o addopts= "
                    f"--junitxml={junit} tests/unit/test_kvm.py tests/unit/test_firmware_edu.py"),
        step("luo_rules", f"PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 {PY} -m tests.lab.guest_luo_rules"),
        step("firmware", f"{PY} -m tests.lab.guest_firmware"),
        step("check", f"{PY} -m luvmm host check --host real --json"),
        step("kexec_load", f"{PY} -m tests.lab.guest_kexec_load"),
    ])
    return lab_run(lab_kernel, shared, cmd)


@pytest.fixture(scope="session")
def dev(lab_devices):
    """What the lab_devices boot recorded (devices.json), with its exit status and output."""
    data = lab_devices.json("devices.json")
    data["_rc"], data["_out"] = lab_devices.text("devices.rc").strip(), lab_devices.text("devices.out")
    return data


@pytest.fixture(scope="session")
def lab_memfd(lab_kernel, tmp_path_factory):
    """Two boots: a memfd preserved across a real kexec through luvmm's handles."""
    shared = tmp_path_factory.mktemp("lab-memfd")
    return lab_run(lab_kernel, shared, [sys.executable, "-m", "tests.lab.guest_memfd"])


@pytest.fixture(scope="session")
def lab_selftests(lab_kernel, tmp_path_factory):
    """Two boots: the upstream LUO selftests with their stage protocol."""
    shared = tmp_path_factory.mktemp("lab-selftests")
    return lab_run(lab_kernel, shared, [sys.executable, "-m", "tests.lab.guest_selftests"])


@pytest.fixture(scope="session")
def lab_real_host(lab_kernel, tmp_path_factory):
    """Four boots, three real kexecs: luvmm's own commands on the real LUO
    kernel, with two edu functions (tests/lab/guest_real_host.py)."""
    shared = tmp_path_factory.mktemp("lab-real-host")
    precompile(str(shared / "state" / "pycache"))
    return lab_run(lab_kernel, shared, [sys.executable, "-m", "tests.lab.guest_real_host"], devices=2, timeout=1500)
