"""`luvmm lab` as a user runs it: a mistake is one clear line and a non-zero
exit, and nothing is left behind (no QEMU, no temporary directory); with a
lab kernel, `luvmm lab run -- CMD` gives back CMD's output and exit status
and a timeout stops QEMU."""

import glob
import os
import subprocess
import sys
import tempfile

import pytest

from luvmm.lab import ROOT


def luvmm(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "luvmm", *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, **(env or {})), timeout=timeout)


def leftovers() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "luvmm-lab-*")))


def qemus_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmdline and marker in cmdline:
            found.append(int(pid))
    return found


def one_line_error(result, text):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert text in lines[0], lines[0]


def test_run_without_a_lab_kernel_says_build_one(tmp_path):
    before = leftovers()
    result = luvmm("lab", "run", "--", "true", env={"LUVMM_LAB_CACHE": str(tmp_path / "empty")})
    one_line_error(result, "no lab kernel: run `luvmm lab build`")
    assert leftovers() == before


def test_mistakes_are_one_line(tmp_path):
    one_line_error(luvmm("lab", "run", env={"LUVMM_LAB_CACHE": str(tmp_path)}), "no command")
    one_line_error(luvmm("lab", "build", "--kernel-src", str(tmp_path)), "not a kernel source tree")
    one_line_error(luvmm("lab", "build", "--config", str(tmp_path / "missing.config"),
                         env={"LUVMM_LAB_CACHE": str(tmp_path / "cache")}), "--config")
    one_line_error(luvmm("lab", "build", env={"LUVMM_LAB_CACHE": "/proc/no-cache-here"}), "/proc/no-cache-here")
    one_line_error(luvmm("lab", "kexec", env={"LUVMM_LAB_SHARED": ""}), "not in a lab guest")
    one_line_error(luvmm("lab", "run", "--kernel", "nosuchbuild", "--", "true"), "no lab kernel 'nosuchbuild'")


def test_accel_kvm_where_kvm_cannot_run_a_full_guest(lab_kernel):
    from luvmm.lab.run import hardware_kvm

    usable, why = hardware_kvm()
    if usable:
        pytest.skip(f"/dev/kvm has hardware virtualization here ({why})")
    before = leftovers()
    one_line_error(luvmm("lab", "run", "--accel", "kvm", "--", "true"), f"--accel kvm: {why}")
    assert leftovers() == before


def test_every_argument_has_help():
    for command in ("build", "run", "kexec"):
        out = luvmm("lab", command, "--help").stdout
        assert "usage: luvmm lab " + command in out
    import argparse

    from luvmm.cli import build_parser

    def walk(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub)
            elif action.dest != "help":
                yield parser.prog, action
    lab = [(prog, a) for prog, a in walk(build_parser()) if prog.startswith("luvmm lab")]
    assert lab and all(a.help for prog, a in lab), [(prog, a.dest) for prog, a in lab if not a.help]


def test_run_gives_back_output_and_exit_status(lab_kernel, tmp_path):
    before = leftovers()
    results = tmp_path / "results"
    result = luvmm("lab", "run", "--results", str(results), "--",
                   "sh", "-c", 'echo "stage $LUVMM_LAB_STAGE on $(uname -r) with $LUVMM_LAB_DEVICES"; '
                               'ls /dev/liveupdate /dev/iommu /dev/kvm /dev/vfio/devices; exit 3')
    assert result.returncode == 3, result.stderr
    assert f"stage 1 on {lab_kernel['kernelrelease']} with 0000:" in result.stdout
    for node in ("/dev/liveupdate", "/dev/iommu", "/dev/kvm", "vfio0"):
        assert node in result.stdout
    assert "1 stage(s)" in result.stderr and "exit status 3" in result.stderr
    assert (results / "boots.jsonl").exists() and (results / "dmesg-1.txt").exists()
    assert leftovers() == before


@pytest.mark.timeout(120)
def test_a_timeout_stops_qemu_and_leaves_nothing(lab_kernel, tmp_path):
    before = leftovers()
    results = tmp_path / "timeout-results"
    result = luvmm("lab", "run", "--timeout", "20", "--results", str(results), "--",
                   "sh", "-c", "echo started; exec sleep 600", timeout=90)
    one_line_error(result, "timed out after 20 s")
    assert result.returncode == 124
    assert qemus_with(str(results)) == []
    assert leftovers() == before
