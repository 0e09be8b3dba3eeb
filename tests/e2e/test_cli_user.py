"""A user's mistakes never break the host (issue 12): each scenario runs the
real CLI against a real host daemon, asserts the message and the exit
status, that the host serves the next command normally, and (the ``cli``
fixture) that nothing is left behind and nothing printed a traceback."""

import json
import os
import re
import signal
import socket
import stat
import subprocess
import time

import pytest

from luvmm import exitcodes

SUPPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support")

SMALL = ("--guest", "synthetic", "--memory", "64M")


def host_status(cli, *extra):
    return json.loads(cli("host", "status", "--json", *extra).stdout)


def vm_pid(cli, name):
    return json.loads(cli("vm", "status", name, "--json").stdout)[name]["pid"]


# --- 1. a stopped VM leaves nothing behind -------------------------------------------------------


def test_a_stopped_vm_releases_its_session_files_registration_and_device(cli):
    cli("host", "start", "--devices", "2")
    cli("vm", "start", "a", *SMALL)
    cli("vm", "start", "b", *SMALL)
    device_a = json.loads(cli("vm", "status", "a", "--json").stdout)["a"]["bdf"]
    assert cli("vm", "stop", "a").stdout.strip() == "VM a stopped"
    status = host_status(cli)
    assert [s["name"] for s in status["kernel"]["sessions"]] == ["b"]
    assert not [f for f in status["kernel"]["open_files"] if "session:a" in f]
    assert not next(d for d in status["kernel"]["vfio"] if d["bdf"] == device_a)["bound"]  # the device is free
    from luvmm.liveupdate.agent_client import AgentClient
    from luvmm.liveupdate.state import StateDir

    agent = AgentClient(StateDir(cli.state))
    try:
        agent_status = agent.call({"op": "status"})[0]
        assert agent_status["vmms"] == ["b"] and agent_status["outgoing"] == ["b"]
    finally:
        agent.close()
    assert "vm-a" not in [u["name"] for u in status["units"]]  # its unit, and its fd store, are gone
    update = json.loads(cli("update", "--json").stdout)
    assert [c["vm"] for c in update["cycles"]] == ["b"] and update["cycles"][0]["dma_lost"] == 0
    # The freed device takes a new VM.
    assert f"DSA {device_a}" in cli("vm", "start", "c", *SMALL).stdout
    cli("vm", "stop", "b")
    cli("vm", "stop", "c")
    cli("host", "stop")


def test_the_agent_notices_a_vmm_whose_channel_closed(cli):
    """A registered VMM that goes away is dropped at once, not at the next update."""
    import sys

    from luvmm.liveupdate.state import StateDir
    from tests.support.agent import registered

    cli("host", "start")
    state = StateDir(cli.state)
    state.write_unit("vm-x", [sys.executable, os.path.join(SUPPORT, "fake_vmm.py")],
                     {"FAKE_VM_NAME": "x"})
    from luvmm.liveupdate.emu.client import connect

    host = connect(state.socket)
    try:
        host.call({"op": "unit-start", "name": "vm-x"})
        registered(state, ["x"])
        state.remove_unit("vm-x")  # so that init does not restart it
        host.call({"op": "unit-stop", "name": "vm-x"})
    finally:
        host.close_connection()
    from luvmm.liveupdate.agent_client import AgentClient

    deadline = time.monotonic() + 10
    while True:
        agent = AgentClient(state)
        try:
            vmms = agent.call({"op": "status"})[0]["vmms"]
        finally:
            agent.close()
        if not vmms or time.monotonic() > deadline:
            break
        time.sleep(0.02)  # the agent is another process reading the hang-up
    assert vmms == []
    cli("host", "stop")


# --- 2. an update with no VM ---------------------------------------------------------------------


def test_update_with_no_vm_says_so_at_once_and_changes_nothing(cli):
    cli("host", "start")
    started = time.monotonic()
    proc = cli("update", status=exitcodes.FAILED)
    assert time.monotonic() - started < 10
    assert "no VM runs on the host" in cli.error_line(proc) and proc.stdout == ""
    assert host_status(cli)["kexec_count"] == 0
    # The agent refuses it too (a script asking it directly), and nothing is left in progress.
    from luvmm.liveupdate.agent_client import AgentClient, AgentError
    from luvmm.liveupdate.state import StateDir

    agent = AgentClient(StateDir(cli.state))
    try:
        with pytest.raises(AgentError, match="no VM runs on this host") as e:
            agent.call({"op": "update", "timeout": 5})
        assert e.value.errno == 2  # ENOENT
        assert agent.call({"op": "status"})[0]["update"] is None
    finally:
        agent.close()
    assert host_status(cli)["kexec_count"] == 0
    cli("vm", "start", "a", *SMALL)
    update = json.loads(cli("update", "--json").stdout)
    assert len(update["cycles"]) == 1 and update["cycles"][0]["guest_progressed"]
    cli("vm", "stop", "a")
    cli("host", "stop")


# --- 3. a bare kexec with VMs running --------------------------------------------------------------


def test_a_bare_kexec_with_vms_running_is_refused_unless_forced(cli):
    cli("host", "start")
    cli("vm", "start", "a", *SMALL)
    pid = vm_pid(cli, "a")
    proc = cli("host", "kexec", status=exitcodes.FAILED)
    line = cli.error_line(proc)
    assert "VM(s) a run on this host" in line and "luvmm update" in line and "--force" in line
    assert host_status(cli)["kexec_count"] == 0 and vm_pid(cli, "a") == pid  # nothing happened
    proc = cli("host", "kexec", "--force")
    assert "VM(s) a were not prepared" in proc.stderr and "lost" in proc.stderr
    assert "kexec done: generation 2" in proc.stdout
    # What it said: the VM is lost (its VMM found no saved machine state).
    deadline = time.monotonic() + 30
    while cli("vm", "status", "a", status=None).returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.1)  # the restored VMM is another process finding out
    proc = cli("vm", "status", "a", status=exitcodes.FAILED)
    assert "a: not running" in proc.stdout
    cli("vm", "stop", "a")
    assert "kexec done: generation 3" in cli("host", "kexec").stdout  # no VM: a plain kexec
    cli("host", "stop")


# --- 4. VM names --------------------------------------------------------------------------------------


BAD_NAMES = ("../../etc", ".", "..", "a/b", "", "x" * 200, "-x", "a b", "é")


def test_bad_vm_names_are_refused_in_one_line_and_touch_nothing(cli):
    cli("host", "start")
    cli("vm", "start", "a", *SMALL)
    before = sorted(os.listdir(cli.state)), sorted(os.listdir(os.path.join(cli.state, "vms")))
    for name in BAD_NAMES:
        for args in (("vm", "start", *SMALL, "--", name), ("vm", "stop", "--", name), ("vm", "status", "--", name)):
            proc = cli(*args, status=exitcodes.USAGE)
            assert "VM name" in cli.error_line(proc), args
    assert (sorted(os.listdir(cli.state)), sorted(os.listdir(os.path.join(cli.state, "vms")))) == before
    assert not os.path.exists(os.path.join(os.path.dirname(cli.state), "etc"))
    assert cli("vm", "status", "a").returncode == 0  # a is still reachable
    # The daemon and the agent check names too (a script speaking to them directly).
    from luvmm.liveupdate.agent_client import AgentClient, AgentError
    from luvmm.liveupdate.state import StateDir
    from luvmm.liveupdate.emu.client import connect

    host = connect(os.path.join(cli.state, "host.sock"))
    agent = AgentClient(StateDir(cli.state))
    try:
        for name in ("vm-..", "../x", "", "vm-a/../../b"):
            with pytest.raises(OSError) as e:
                host.call({"op": "unit-stop", "name": name})
            assert e.value.errno == 22
        for name in BAD_NAMES:
            for op in ("create-session", "retrieve-session", "release"):
                with pytest.raises(AgentError) as e:
                    agent.call({"op": op, "name": name})
                assert e.value.errno == 22, (op, name)
    finally:
        agent.close()
        host.close_connection()
    assert host_status(cli)["units"][1]["running"]  # vm-a
    cli("vm", "stop", "a")
    cli("host", "stop")


def test_the_longest_valid_name_works(cli):
    name = "v" * 63
    cli("vm", "start", name, *SMALL)
    assert name in cli("vm", "list").stdout
    cli("vm", "stop", name)
    cli("host", "stop")


# --- 5. exit statuses ----------------------------------------------------------------------------------


def test_vm_status_exits_1_for_a_missing_vm(cli):
    cli("vm", "start", "a", *SMALL)
    proc = cli("vm", "status", "nope", status=exitcodes.FAILED)
    assert cli.error_line(proc).endswith(f"no VM 'nope' in {cli.state}")
    assert cli("vm", "status").returncode == 0
    cli("vm", "stop", "a")
    cli("host", "stop")


def test_outcome_gives_each_kind_of_run_its_exit_status():
    from luvmm.liveupdate.update import outcome

    def run(**cycle):
        base = {"cycle": 1, "vm": "a", "blackout_s": 0.05, "dma_errors": 0, "dma_lost": 0, "dma_corrupted": 0,
                "guest_progressed": True, "device_reset": False, "dma_completed_during_blackout": 5}
        return {"cycles": [dict(base, **cycle)], "failed_updates": []}

    assert outcome(run())[0] == exitcodes.OK
    assert outcome(run(dma_lost=3))[0] == exitcodes.DAMAGED
    assert outcome(run(dma_errors=1))[0] == exitcodes.DAMAGED
    assert outcome(run(guest_progressed=False))[0] == exitcodes.DAMAGED
    assert outcome(run(dma_lost=31, device_reset=True))[0] == exitcodes.DEVICE_RESET
    assert outcome(run(dma_corrupted=1, device_reset=True))[0] == exitcodes.DAMAGED  # corruption is never fine
    assert outcome(dict(run(), failed_updates=["update 2/2 failed: x"]))[0] == exitcodes.FAILED
    assert outcome({"cycles": [{"cycle": 1, "vm": "a", "error": "no report"}], "failed_updates": []})[0] == 1


def test_update_on_a_kernel_that_resets_the_device_exits_4(cli):
    cli("host", "start", "--kernel-profile", "reset-on-freeze")
    cli("vm", "start", "a", "--memory", "64M")
    proc = cli("update", status=exitcodes.DEVICE_RESET)
    assert "the kernel reset the device" in proc.stderr and "the VM survived" in proc.stderr
    cli("vm", "stop", "a")
    cli("host", "stop")


# --- 6. read-only commands change nothing; the state dir ----------------------------------------------


def test_read_only_commands_start_nothing_and_create_nothing(cli):
    typo = os.path.join(cli.root, "typo")
    for args in (("host", "status"), ("vm", "status"), ("vm", "status", "a"), ("host", "faults"), ("update",),
                 ("host", "kexec")):
        proc = cli(*args, "--state-dir", typo, status=exitcodes.FAILED)
        assert f"no emulated host is running in {typo}" in cli.error_line(proc)
    assert cli("vm", "list", "--state-dir", typo).stdout == ""
    assert json.loads(cli("vm", "list", "--state-dir", typo, "--json").stdout) == []
    proc = cli("host", "stop", "--state-dir", typo)
    assert "no emulated host is running" in proc.stderr
    assert not os.path.exists(typo)


def test_a_directory_the_user_points_at_is_not_chmodded_and_is_left_as_found(cli):
    mine = os.path.join(cli.root, "mine")
    os.mkdir(mine, 0o755)
    os.chmod(mine, 0o755)
    with open(os.path.join(mine, "notes.txt"), "w") as f:
        f.write("mine\n")
    cli.keep(os.path.join(mine, "notes.txt"))
    cli("host", "start", "--state-dir", mine)
    assert stat.S_IMODE(os.stat(mine).st_mode) == 0o755  # used as it is
    assert stat.S_IMODE(os.stat(os.path.join(mine, "host.sock")).st_mode) == 0o600
    cli("host", "stop", "--state-dir", mine)
    assert os.listdir(mine) == ["notes.txt"]  # as found
    # One that others may write into could hold a planted unit: refused.
    shared = os.path.join(cli.root, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o777)
    cli.keep(shared)
    proc = cli("host", "start", "--state-dir", shared, status=exitcodes.FAILED)
    assert "writable by other users" in cli.error_line(proc) and os.listdir(shared) == []


def test_host_start_says_it_boots_the_vms_of_an_earlier_run(cli):
    cli("vm", "start", "a", *SMALL)
    proc = cli("host", "stop")
    assert "kept the definitions of VM(s) a" in proc.stdout
    assert sorted(os.listdir(cli.state)) == [".luvmm-state", "host.json", "host.log", "logs", "units", "vms"]
    listed = cli("vm", "list").stdout.splitlines()
    assert listed[0].split()[:2] == ["NAME", "STATE"] and listed[1].split()[:3] == ["a", "host", "stopped"]
    proc = cli("host", "start")
    assert "booting 1 VM(s) defined there by an earlier run, cold" in proc.stdout and ": a" in proc.stdout
    cli("vm", "stop", "a")
    cli("host", "stop")
    assert not os.path.exists(cli.state)  # luvmm made it, and nothing is left in it


def test_vm_stop_without_a_host_removes_the_definition(cli):
    cli("vm", "start", "a", *SMALL)
    cli("host", "stop")
    assert "VM a removed (no host was running it)" in cli("vm", "stop", "a").stdout
    cli("host", "stop")  # nothing runs: says so, exit 0
    assert not os.path.exists(cli.state)


# --- 7. no tracebacks ------------------------------------------------------------------------------------


def test_a_state_dir_that_is_a_file_gets_one_line(cli):
    path = os.path.join(cli.root, "afile")
    open(path, "w").close()
    cli.keep(path)
    for args in (("host", "start"), ("vm", "start", "a", *SMALL)):
        proc = cli(*args, "--state-dir", path, status=exitcodes.FAILED)
        assert f"{path} is not a directory" in cli.error_line(proc)


def test_a_read_only_state_dir_gets_one_line(cli):
    ro = os.path.join(cli.root, "ro")
    os.mkdir(ro)
    cli.keep(ro)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,mode=0700", "tmpfs", ro], capture_output=True).returncode:
        pytest.skip("needs to mount a read-only tmpfs (root)")
    try:
        for state in (ro, os.path.join(ro, "sub")):
            proc = cli("host", "start", "--state-dir", state, status=exitcodes.FAILED)
            assert "Read-only file system" in cli.error_line(proc)
    finally:
        subprocess.run(["umount", ro], check=True)


def _taken_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, str(s.getsockname()[1])


def test_a_metrics_port_in_use_gets_one_line_and_leaves_nothing(cli):
    s, port = _taken_port()
    with s:
        proc = cli("host", "start", "--metrics-port", port, status=exitcodes.FAILED)
        line = cli.error_line(proc)
        assert f"cannot serve metrics on {port}" in line and "Address already in use" in line
        assert not os.path.exists(cli.state)
        cli("host", "start")
        proc = cli("vm", "start", "a", *SMALL, "--metrics-port", port, status=exitcodes.FAILED)
        assert "Address already in use: the VM was not started" in cli.error_line(proc)
        assert cli("vm", "list").stdout == ""
        cli("vm", "start", "a", *SMALL)  # the host serves the next command
        cli("vm", "stop", "a")
        cli("host", "stop")


def test_bad_sizes_and_counts_get_one_line(cli):
    for args in (("demo", "--memory", "0"), ("vm", "start", "a", "--memory", "3M"), ("demo", "--memory", "lots"),
                 ("bench", "scale", "--memory", "1G,x"), ("bench", "dsa", "--bytes", "-1"),
                 ("host", "start", "--devices", "-3"), ("vm", "start", "a", "--vcpus", "99"),
                 ("update", "--cycles", "0"), ("update", "--timeout", "-1"), ("update", "--json", cli.root),
                 ("host", "start", "--guest-cpus", "1-x"), ("host", "start", "--guest-cpus", "4095"),
                 ("bench", "blackout", "--guest-cpus", "2-1"), ("bench", "load", "--clients", "0")):
        proc = cli(*args, status=exitcodes.USAGE)
        assert cli.error_line(proc).startswith("luvmm"), args
    assert not os.path.exists(cli.state)


def test_ctrl_c_in_update_keeps_the_cycles_done_and_leaves_the_host_serving(cli):
    cli("vm", "start", "a", *SMALL)
    run = cli.spawn_on_pty("update", "--cycles", "50")
    run.expect(r"update 1/50: a: blackout [\d.]+ ms")
    run.interrupt()
    assert run.wait() == exitcodes.INTERRUPTED
    assert "interrupted after" in run.output and "Traceback" not in run.output
    done = len(re.findall(r"^\s+\d+ a\s+[\d.]+", run.output, re.M))  # the table of what was done
    assert done >= 1, run.output
    update = json.loads(cli("update", "--json").stdout)  # the host serves the next one
    assert update["cycles"][0]["guest_progressed"]
    cli("vm", "stop", "a")
    cli("host", "stop")


def test_ctrl_c_in_demo_writes_the_report_so_far_and_leaks_nothing(cli):
    report = os.path.join(cli.root, "report")
    cli.keep(report)
    run = cli.spawn_on_pty("demo", "--cycles", "30", "--memory", "64M", "--report", report)
    run.expect(r"update 1: blackout")
    run.interrupt()
    assert run.wait() == exitcodes.INTERRUPTED, run.output
    assert "Traceback" not in run.output
    summary = json.loads(open(os.path.join(report, "summary.json")).read())
    # The report holds exactly the updates the user saw finish, with the same blackouts.
    printed = [float(ms) for ms in re.findall(r"update \d+: blackout ([\d.]+) ms", run.output)]
    assert printed and [round(c["blackout_s"] * 1000, 1) for c in summary["summary"]["cycles"]] == printed
    assert os.path.exists(os.path.join(report, "index.html"))
    state = re.search(r"Starting an emulated host in (\S+) ", run.output).group(1)
    assert state.startswith(cli.root) and not os.path.exists(state)  # its temp dir went with its host


def test_a_demo_killed_by_sigterm_stops_its_host_and_leaks_nothing(cli):
    """`kill PID` (or a CI job's timeout) ends a command as Ctrl-C does: its
    embedded host is stopped, its temp dir removed, no process left behind
    (the fixture checks), where the default action would leave them running."""
    report = os.path.join(cli.root, "report")
    cli.keep(report)
    run = cli.spawn_on_pty("demo", "--cycles", "30", "--memory", "64M", "--report", report)
    run.expect(r"update 1: blackout")
    os.kill(run.proc.pid, signal.SIGTERM)
    assert run.wait() == exitcodes.INTERRUPTED, run.output
    assert "Traceback" not in run.output and "interrupted" in run.output
    state = re.search(r"Starting an emulated host in (\S+) ", run.output).group(1)
    assert state.startswith(cli.root) and not os.path.exists(state)


def test_demo_whose_vm_cannot_start_leaks_no_temp_dir(cli):
    proc = cli("demo", "--memory", "1T", "--report", os.path.join(cli.root, "r"), status=exitcodes.FAILED)
    assert "needs 1024.0 GiB of RAM" in cli.error_line(proc)
    s, port = _taken_port()
    with s:
        proc = cli("demo", "--metrics-port", port, "--report", os.path.join(cli.root, "r"), status=exitcodes.FAILED)
        assert "Address already in use" in cli.error_line(proc)


# --- 8. a VM larger than the machine -------------------------------------------------------------------


def test_a_vm_larger_than_the_machine_is_refused_unless_overcommitted(cli):
    from luvmm.vmm.manage import machine_memory

    too_big = f"{(machine_memory() >> 30) + 2}G"
    proc = cli("vm", "start", "big", "--memory", too_big, "--guest", "synthetic", status=exitcodes.FAILED)
    assert "--overcommit" in cli.error_line(proc) and "the machine has" in proc.stderr
    assert not os.path.exists(cli.state)  # refused before a host was started for it
    cli("host", "start")  # one DSA
    cli("vm", "start", "a", *SMALL)
    cli("vm", "start", "big", "--memory", too_big, "--guest", "synthetic", "--overcommit", "--device", "auto",
        status=exitcodes.FAILED)  # fits the check, but this host has one DSA: a's
    cli("vm", "stop", "a")
    cli("vm", "start", "big", "--memory", too_big, "--guest", "synthetic", "--overcommit")
    cli("vm", "stop", "big")
    cli("host", "stop")


# --- the CLI's conventions -------------------------------------------------------------------------------


def _actions(parser, path=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, path + (name,))
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield path, action


def test_every_argument_has_help_text():
    from luvmm.cli import build_parser

    missing = [f"{' '.join(path)} {action.dest}" for path, action in _actions(build_parser()) if not action.help]
    assert missing == []


def test_json_means_the_same_everywhere(cli):
    """--json: one JSON document on stdout instead of the text, for every command that has it."""
    from luvmm.cli import build_parser

    with_json = sorted({" ".join(path) for path, action in _actions(build_parser()) if action.dest == "json"})
    assert {"host status", "vm list", "vm status", "host faults", "update", "bench dsa", "bench blackout",
            "uapi"} <= set(with_json)
    cli("vm", "start", "a", *SMALL)
    for args in (("uapi",), ("host", "status"), ("host", "faults"), ("vm", "list"), ("vm", "status"),
                 ("update",), ("bench", "dsa", "--bytes", "1M", "--batches", "1"), ("host", "kexec", "--force")):
        proc = cli(*args, "--json")
        json.loads(proc.stdout)  # nothing but the document on stdout
    cli("vm", "stop", "a")
    cli("host", "stop")


def test_json_file_of_a_long_run_gets_the_document_and_stdout_the_text(cli):
    """`update` and the benchmarks take --json FILE: the document goes there,
    the text to stdout; a FILE that cannot be written is refused before the run."""
    cli("vm", "start", "a", *SMALL)
    out = os.path.join(cli.root, "update.json")
    cli.keep(out)
    proc = cli("update", "--json", out)
    assert "blackout p50" in proc.stdout, proc.stdout
    assert json.load(open(out))["cycles"][0]["vm"] == "a"
    for dest, why in ((cli.root, "is a directory"), (os.path.join(cli.root, "no", "x.json"), "cannot write in")):
        proc = cli("update", "--json", dest, status=2)
        assert proc.stderr.strip() == f"luvmm update: --json {dest}: {why}" + (
            f" {os.path.dirname(dest)}" if why == "cannot write in" else "")
    assert json.loads(cli("host", "status", "--json").stdout)["kexec_count"] == 1  # the refusals changed nothing
    cli("vm", "stop", "a")
    cli("host", "stop")


def test_long_work_shows_progress_on_a_terminal_only(cli):
    cli("vm", "start", "a", *SMALL)
    run = cli.spawn_on_pty("update", "--cycles", "2")
    assert run.wait() == 0
    assert len(re.findall(r"update \d/2: a: blackout", run.output)) == 2
    proc = cli("update", "--cycles", "2")
    assert "update 1/2" not in proc.stdout + proc.stderr
    cli("vm", "stop", "a")
    cli("host", "stop")


def test_host_check_on_the_emulated_host(cli):
    """`luvmm host check`: everything present on the emulated host (probed by
    the agent, which holds /dev/liveupdate), the device held by a VM's
    session still counts, the probe leaves no session behind; a profile that
    resets the device is exit 4; a bad BDF one line and exit 2."""
    assert "no emulated host is running" in cli.error_line(cli("host", "check", status=exitcodes.FAILED))
    cli("host", "start")
    result = json.loads(cli("host", "check", "--json").stdout)
    assert all(f["present"] for f in result["findings"]), result["findings"]
    assert result["probe"] == {"memfd": "0", "vfio": "0", "iommufd": "0", "hwpt": "ENOENT"}  # no HWPT 0
    assert result["dma_continuity"] and result["host"] == "emulated"
    cli("vm", "start", "a", *SMALL)
    result = json.loads(cli("host", "check", "--json").stdout)
    assert result["probe"]["vfio"] == "EBUSY" and result["dma_continuity"]  # a's session holds the device
    assert [s["name"] for s in host_status(cli)["kernel"]["sessions"]] == ["a"]  # the probe's session is gone
    assert cli.error_line(cli("host", "check", "--device", "x", status=exitcodes.USAGE)).startswith(
        "luvmm host check: --device x: not a PCI address")
    cli("vm", "stop", "a")
    cli("host", "stop")
    cli("host", "start", "--kernel-profile", "reset-on-freeze")
    proc = cli("host", "check", status=exitcodes.DEVICE_RESET)
    assert "its device is reset" in proc.stdout
    cli("host", "stop")


def test_vm_list_shows_each_vms_pid_memory_device_uptime_and_last_blackout(cli):
    """`luvmm vm list` (issue 24): what a user looks for first, in one line a VM."""
    cli("vm", "start", "a", *SMALL)
    [row] = json.loads(cli("vm", "list", "--json").stdout)
    status = json.loads(cli("vm", "status", "a", "--json").stdout)["a"]
    assert row["name"] == "a" and row["state"] == "running" and row["pid"] == status["pid"]
    assert row["memory_bytes"] == status["config"]["memory"] and row["device"] == status["bdf"]
    assert row["uptime_s"] >= 0 and row["last_blackout_s"] is None  # no update yet
    cli("update")
    [row] = json.loads(cli("vm", "list", "--json").stdout)
    last = json.loads(cli("update", "--last", "--json").stdout)["cycles"][0]
    assert row["last_blackout_s"] == last["blackout_s"] and row["pid"] != status["pid"]  # a new VMM, the same VM
    heading, line = cli("vm", "list").stdout.splitlines()
    assert heading.split() == ["NAME", "STATE", "PID", "MEMORY", "DEVICE", "UPTIME", "LAST", "BLACKOUT"]
    assert line.split()[:6] == ["a", "running", str(row["pid"]), str(row["memory_bytes"] >> 20), "MiB", row["device"]]
    assert line.endswith(f"{row['last_blackout_s'] * 1000:.1f} ms")
    cli("vm", "stop", "a")
    cli("host", "stop")


def test_a_killed_host_is_cleaned_up_by_host_stop_and_started_again_as_it_was(cli):
    """Issue 24's friction: after `kill -9` of the daemon, `host stop` said
    none runs and left its files; `host start` over it forgot --devices (the
    second VM then had no DSA)."""
    cli("host", "start", "--devices", "2")
    cli("vm", "start", "a", *SMALL)
    cli("vm", "start", "b", *SMALL)
    with open(os.path.join(cli.state, "host.pid")) as f:
        os.kill(int(f.read()), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while cli("host", "status", status=None).returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # the daemon is another process dying
    proc = cli("host", "stop")
    assert "it had died" in proc.stdout and "kept the definitions of VM(s) a, b" in proc.stdout
    assert not any(os.path.exists(os.path.join(cli.state, f)) for f in ("host.sock", "host.pid", "agent.sock"))
    proc = cli("host", "start")
    assert "with the options of the host that ran there before: --devices 2" in proc.stdout
    assert "2 DSA" in proc.stdout
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # both VMs boot again, cold, each on its own DSA
        rows = json.loads(cli("vm", "list", "--json").stdout)
        if all(r["state"] == "running" for r in rows):
            break
        time.sleep(0.1)  # their VMMs are other processes booting their guests
    assert sorted((r["name"], r["state"]) for r in rows) == [("a", "running"), ("b", "running")]
    assert len({r["device"] for r in rows}) == 2
    cli("vm", "stop", "a")
    cli("vm", "stop", "b")
    cli("host", "stop")


def test_failure_lines_name_their_command_and_say_the_cause_once(cli):
    """Issue 24's friction: `luvmm:` instead of `luvmm COMMAND:`, a huge
    --memory called "not a whole number", a VMM's error nested in another."""
    proc = cli("vm", "start", "x", "--memory", "99999999999999999999", status=exitcodes.USAGE)
    assert "too big" in cli.error_line(proc)
    cli("host", "start")  # one DSA
    cli("vm", "start", "a", *SMALL)
    proc = cli("vm", "start", "b", *SMALL, status=exitcodes.FAILED)
    line = cli.error_line(proc)
    assert line.startswith("luvmm vm start: every DSA of the host is passed through to another VM"), line
    assert line.count("vmm[") == 0 and "[Errno" not in line and "(the VMM exited with 78; its log: " in line
    cli("vm", "stop", "a")
    cli("host", "stop")


def test_a_vm_that_cannot_start_in_an_empty_dir_keeps_the_log_its_error_points_to(cli):
    """Issue 24, item 2: "see …/vm-t1.log", and that log had been deleted
    with the host started for the VM."""
    proc = cli("vm", "start", "t1", *SMALL, "--device", "0000:99:00.0", status=exitcodes.FAILED)
    started, line = proc.stderr.strip().splitlines()
    assert started.startswith("started an emulated host") and "0000:99:00.0" in line
    log = line.rsplit("its log: ", 1)[1].rstrip(")")
    with open(log) as f:
        assert "0000:99:00.0" in f.read()
    cli.keep(log)
    cli.keep(os.path.join(cli.state, ".luvmm-state"))  # the state dir stays luvmm's, for that log
    assert not any(os.path.exists(os.path.join(cli.state, f)) for f in ("host.sock", "host.pid", "units", "vms"))


def test_vm_log_shows_what_its_vmms_said_start_after_start(cli):
    """Issue 24's friction: no way to see a VM's log from the CLI."""
    cli("vm", "start", "a", *SMALL)
    cli("update")
    lines = cli("vm", "log", "a", "--lines", "0").stdout.splitlines()
    starts = [ln for ln in lines if ln.startswith("--- ") and " start (" in ln]
    assert [s.split(" start (")[1].split(",")[0] for s in starts] == ["cold", "kexec"], lines
    assert len(cli("vm", "log", "a", "-n", "1").stdout.splitlines()) == 1
    proc = cli("vm", "log", "nosuch", status=exitcodes.FAILED)
    assert cli.error_line(proc) == f"luvmm vm log: no VM 'nosuch' in {cli.state}"
    cli("vm", "stop", "a")
    cli("host", "stop")
