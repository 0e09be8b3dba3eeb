"""`luvmm host` and `luvmm update` as a user runs them."""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

SUPPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support")

HERE = os.path.dirname(os.path.abspath(__file__))


def luvmm(*args, env=None, check=True):
    return subprocess.run([sys.executable, "-m", "luvmm", *args], capture_output=True, text=True, check=check,
                          env=dict(os.environ, **(env or {})), timeout=120)


@pytest.fixture
def state_dir():
    path = tempfile.mkdtemp(prefix="luvmm-cli-")
    yield path
    luvmm("host", "stop", "--state-dir", path, check=False)
    shutil.rmtree(path, ignore_errors=True)


def test_host_start_status_kexec_stop(state_dir):
    out = luvmm("host", "start", "--state-dir", state_dir, "--devices", "2", "--no-agent").stdout
    assert "emulated host running" in out
    assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(state_dir, "host.sock")).st_mode) == 0o600  # owner only
    assert luvmm("host", "start", "--state-dir", state_dir, check=False).returncode == 1  # already running
    text = luvmm("host", "status", "--state-dir", state_dir).stdout
    assert "0000:6a:01.0 /dev/vfio/devices/vfio0" in text and "0000:6b:01.0" in text and "kexec count 0" in text
    assert "generation 2" in luvmm("host", "kexec", "--state-dir", state_dir).stdout
    status = json.loads(luvmm("host", "status", "--state-dir", state_dir, "--json").stdout)
    assert status["kexec_count"] == 1 and status["kernel"]["generation"] == 2
    assert "stopped" in luvmm("host", "stop", "--state-dir", state_dir).stdout
    assert not os.path.exists(os.path.join(state_dir, "host.sock"))


def test_vm_start_starts_the_embedded_host_and_says_so_and_nothing_else_does(state_dir):
    env = {"LUVMM_STATE_DIR": state_dir}
    os.rmdir(state_dir)
    for args in (("host", "status"), ("vm", "status"), ("update",), ("host", "kexec"), ("host", "faults")):
        result = luvmm(*args, env=env, check=False)
        assert result.returncode == 1 and f"no emulated host is running in {state_dir}" in result.stderr, args
    assert luvmm("vm", "list", env=env).stdout == ""
    assert not os.path.exists(state_dir)  # looking changed nothing
    result = luvmm("vm", "start", "a", "--guest", "synthetic", "--memory", "64M", env=env)
    assert f"started an emulated host in {state_dir}" in result.stderr
    assert "started an emulated host" not in luvmm("host", "status", env=env).stderr  # running now
    # The embedded host runs the LUO agent unit.
    assert "agent: running" in luvmm("host", "status", env=env).stdout


def test_update_through_the_agent(state_dir):
    luvmm("host", "start", "--state-dir", state_dir, "--no-agent")
    from luvmm.liveupdate.state import StateDir

    state = StateDir(state_dir)
    state.write_unit("agent", [sys.executable, "-m", "luvmm.wiring.agent", "--state-dir", state_dir])
    state.write_unit("vm-x", [sys.executable, os.path.join(SUPPORT, "fake_vmm.py")], {"FAKE_VM_NAME": "x"})
    from luvmm.liveupdate.emu.client import connect

    host = connect(state.socket)
    host.call({"op": "unit-start", "name": "agent"})
    host.call({"op": "unit-start", "name": "vm-x"})
    host.close_connection()
    from tests.support.agent import registered

    registered(state, ["x"])
    summary = json.loads(luvmm("update", "--state-dir", state_dir, "--cycles", "2", "--json").stdout)
    assert [(c["cycle"], c["vm"]) for c in summary["cycles"]] == [(1, "x"), (2, "x")]
    assert all(u["reports"]["x"]["data_ok"] for u in summary["updates"])
