"""`--host emulated|real` (and $LUVMM_HOST) as a user meets it, the ``cli``
fixture checking that nothing is leaked; `luvmm update --last` and
`--require-dma-continuity` on the emulated host.  This machine has no LUO
kernel: the real-host paths tested are the ones that fail cleanly, or run
against a stand-in systemctl; one test drives the real-host update's
order (load, ask, unload) in-process against the emulated host's agent."""

import json
import os
import stat

import pytest

from luvmm import exitcodes

SMALL = ("--guest", "synthetic", "--memory", "64M")
BDF = "0000:00:04.0"


def define_vm(path, name="a", device=BDF):
    """A VM defined in state dir ``path`` as `luvmm vm start` leaves it (its unit and config), not running."""
    from luvmm.liveupdate.state import StateDir

    state = StateDir(path)
    state.write_unit(f"vm-{name}", ["/bin/false"])
    state.make_dir("vms")
    state.make_dir(f"vms/{name}")
    state.write_file(f"vms/{name}/config.json", json.dumps({"name": name, "device": device}).encode())
    return state


# --- the option and its default ---------------------------------------------------------------------


def test_commands_only_an_emulated_host_has_refuse_a_real_one_in_one_line(cli):
    for args in (("demo",), ("bench", "blackout"), ("bench", "soak"), ("host", "start"), ("host", "stop"),
                 ("host", "status"), ("host", "faults"), ("host", "kexec")):
        proc = cli(*args, "--host", "real", status=exitcodes.USAGE)
        assert cli.error_line(proc).startswith(f"luvmm {' '.join(args)}: --host real: "), args
        proc = cli(*args, env={"LUVMM_HOST": "real"}, status=exitcodes.USAGE)
        assert "LUVMM_HOST=real" in cli.error_line(proc) and "--host emulated overrides it" in proc.stderr
    proc = cli("vm", "list", env={"LUVMM_HOST": "metal"}, status=exitcodes.USAGE)
    assert cli.error_line(proc) == "luvmm vm list: LUVMM_HOST=metal: not emulated or real"
    assert cli("vm", "list", "--host", "emulated", env={"LUVMM_HOST": "real"}).stdout == ""  # the option wins
    assert not os.path.exists(cli.state)


def test_update_options_of_a_real_host_are_checked_before_anything(cli):
    for args, says in ((("--host", "real"), "--kernel IMAGE"),
                       (("--kernel", "/boot/vmlinuz"), "--kernel: the emulated host"),
                       (("--initrd", "/boot/initrd"), "--initrd: the emulated host"),
                       (("--host", "real", "--kernel", "/k", "--cycles", "2"), "--cycles 2: one update per run"),
                       (("--host", "real", "--kernel", "/k", "--append", "x", "--reuse-cmdline"), "not allowed"),
                       (("--last", "--kernel", "/k"), "--kernel: not with --last"),
                       (("--last", "--abandon"), "not allowed")):
        proc = cli("update", *args, status=exitcodes.USAGE)
        assert says in cli.error_line(proc), args
    assert not os.path.exists(cli.state)


def test_luvmm_host_real_defaults_to_var_lib_luvmm(cli):
    from luvmm.cli.common import REAL_STATE_DIR
    from luvmm.wiring.systemd import STATE_DIR

    assert REAL_STATE_DIR == STATE_DIR == "/var/lib/luvmm"  # the CLI's default is the units' state dir
    existed = os.path.exists("/var/lib/luvmm")
    real = {"LUVMM_HOST": "real", "LUVMM_STATE_DIR": ""}
    proc = cli("vm", "status", "nope", env=real, status=exitcodes.FAILED)
    assert cli.error_line(proc) == "luvmm vm status: no VM 'nope' in /var/lib/luvmm"
    proc = cli("vm", "status", "nope", "--host", "real", env={"LUVMM_STATE_DIR": ""}, status=exitcodes.FAILED)
    assert cli.error_line(proc).endswith("in /var/lib/luvmm")
    # $LUVMM_STATE_DIR and --state-dir override it, as on the emulated host.
    proc = cli("vm", "status", "nope", env={"LUVMM_HOST": "real"}, status=exitcodes.FAILED)
    assert cli.error_line(proc).endswith(f"no VM 'nope' in {cli.state}")
    mine = os.path.join(cli.root, "mine")
    proc = cli("vm", "status", "nope", "--state-dir", mine, env=real, status=exitcodes.FAILED)
    assert cli.error_line(proc).endswith(f"no VM 'nope' in {mine}")
    if not existed:  # read-only commands create no state dir there
        proc = cli("update", "--kernel", "/nonexistent", env=real, status=exitcodes.FAILED)
        assert "no VM runs on the host in /var/lib/luvmm" in cli.error_line(proc)
        proc = cli("update", "--last", env=real, status=exitcodes.FAILED)
        assert "no update was ever made on this host" in cli.error_line(proc)
        assert not os.path.exists("/var/lib/luvmm")
    assert not os.path.exists(cli.state) and not os.path.exists(mine)


# --- a real host: refusals, a stand-in systemd --------------------------------------------------------


def test_a_real_host_update_with_a_missing_kernel_is_refused_before_any_vm_pauses(cli):
    define_vm(cli.state)
    cli.keep(cli.state)
    proc = cli("update", "--host", "real", "--kernel", "/nonexistent", status=exitcodes.FAILED)
    assert cli.error_line(proc) == ("luvmm update: kernel image /nonexistent: No such file or directory; "
                                    "no VM was paused")
    proc = cli("update", "--host", "real", "--kernel", "/boot/none", "--initrd", "/x", env={"LUVMM_HOST": "real"},
               status=exitcodes.FAILED)
    assert "kernel image /boot/none" in cli.error_line(proc)
    assert proc.stdout == ""


SYSTEMCTL = """#!/bin/sh
# A stand-in systemctl: each call goes to $LOG; `enable` keeps the unit file
# luvmm wrote; `show` says the VM's unit ran and exited with status 1.
echo "$*" >> "{log}"
case "$1" in
  enable) cp "$LUVMM_STATE_DIR/units/vm-a.json" "{seen}"
          cp "$LUVMM_SYSTEMD_ROOT/etc/systemd/system/luvmm-vm@a.socket" "{seen}.socket" 2>/dev/null || true ;;
  show) printf 'Id=luvmm-vm@a.service\\nLoadState=loaded\\nActiveState=failed\\nSubState=failed\\nMainPID=0\\n'
        printf 'ExecMainCode=1\\nExecMainStatus=1\\nNRestarts=0\\n' ;;
esac
"""


@pytest.fixture
def systemd(cli):
    """A stand-in systemctl first in the commands' PATH: (its log, the unit file it saw)."""
    bin_dir = os.path.join(cli.root, "bin")
    os.mkdir(bin_dir)
    log, seen = os.path.join(cli.root, "systemctl.log"), os.path.join(cli.root, "unit.json")
    path = os.path.join(bin_dir, "systemctl")
    with open(path, "w") as f:
        f.write(SYSTEMCTL.format(log=log, seen=seen))
    os.chmod(path, 0o755)
    root = os.path.join(cli.root, "sysroot")  # where the VM's socket unit is written
    for p in (bin_dir, log, seen, seen + ".socket", cli.state, root):
        cli.keep(p)
    cli.env["PATH"] = f"{bin_dir}:{cli.env['PATH']}"
    cli.env["LUVMM_SYSTEMD_ROOT"] = root
    return log, seen


def test_vm_start_on_a_real_host_runs_its_unit_with_host_real(cli, systemd):
    log, seen = systemd
    proc = cli("vm", "start", "a", "--host", "real", *SMALL, status=exitcodes.USAGE)
    assert "--device BDF" in cli.error_line(proc)
    proc = cli("vm", "start", "a", "--host", "real", "--device", BDF, *SMALL, status=exitcodes.FAILED)
    # No log file on a systemd host: the journal has the VMM's output.
    assert cli.error_line(proc) == "luvmm vm start: the VMM exited with 1 (see journalctl -u luvmm-vm@a.service)"
    unit = json.load(open(seen))
    argv = unit["argv"]
    assert argv[-1].endswith(f"main(['--state-dir', '{cli.state}', '--name', 'a', '--host', 'real']))")
    calls = open(log).read().splitlines()
    assert calls[0] == "enable --now luvmm-vm@a.service" and calls[-1] == "disable --now luvmm-vm@a.service"
    assert cli("vm", "list", "--host", "real").stdout == ""  # a VM that did not start leaves nothing
    assert os.listdir(os.path.join(cli.state, "vms")) == []
    assert stat.S_IMODE(os.stat(cli.state).st_mode) == 0o700  # made by the VM's start, as on the emulated host
    assert not os.path.exists(os.path.join(cli.root, "state", "host.sock"))  # no emulated host was started


def test_a_real_hosts_vm_with_a_metrics_port_gets_a_socket_unit_and_it_goes_with_the_vm(cli, systemd):
    """Its port bound by systemd (luvmm-vm@NAME.socket), not by its VMM: no
    one takes it while the VMM restarts or the host kexecs (issue 24, item 5)."""
    log, seen = systemd
    cli("vm", "start", "a", "--host", "real", "--device", BDF, *SMALL, "--metrics-port", "19191",
        status=exitcodes.FAILED)  # the stand-in says its VMM exited
    with open(seen + ".socket") as f:  # there when systemd was asked to start the VM
        socket_unit = f.read()
    assert "ListenStream=127.0.0.1:19191" in socket_unit and "FileDescriptorName=metrics" in socket_unit
    calls = open(log).read().splitlines()
    assert calls[0] == "enable --now luvmm-vm@a.service" and calls[-1] == "disable --now luvmm-vm@a.service"
    units = os.path.join(cli.env["LUVMM_SYSTEMD_ROOT"], "etc", "systemd", "system")
    assert os.listdir(units) == []  # removed with the VM that did not start


def test_vm_list_status_stop_on_a_real_host_work_on_its_state_dir(cli, systemd):
    log, _ = systemd
    define_vm(cli.state)
    assert cli("vm", "list", "--host", "real").stdout.splitlines()[1].split()[:3] == ["a", "not", "running"]
    proc = cli("vm", "status", "--host", "real", status=exitcodes.FAILED)
    assert proc.stdout.startswith("a: not running (its VMM does not answer")
    assert cli("vm", "stop", "a", "--host", "real").stdout.strip() == "VM a stopped"
    # (`vm status` asked systemd what became of the VMM that does not answer: `show`, which changes nothing.)
    assert [c for c in open(log).read().splitlines() if not c.startswith("show ")] == ["disable --now luvmm-vm@a.service"]
    assert cli("vm", "list", "--host", "real").stdout == ""


# --- update --last, --require-dma-continuity (the emulated host) --------------------------------------


def test_update_last_prints_the_last_updates_report(cli):
    cli("host", "start")
    proc = cli("update", "--last", status=exitcodes.FAILED)
    assert "no update was ever made on this host" in cli.error_line(proc)
    cli("vm", "start", "a", *SMALL)
    update = json.loads(cli("update", "--json").stdout)
    last = json.loads(cli("update", "--last", "--json").stdout)
    assert last["cycles"] == update["cycles"] and last["updates"][0]["id"] == update["updates"][0]["id"]
    text = cli("update", "--last").stdout
    assert "blackout p50" in text and "    1 a " in text
    # The next update, of a guest that ran since the first: the outage the guest saw, measured by the bus
    # observer, beside the blackout.
    second = json.loads(cli("update", "--json").stdout)
    cycle = second["cycles"][0]
    assert 0 <= cycle["guest_lost_s"] <= 0.5 and cycle["guest_pace_before_hz"] > 0
    assert cycle["guest_recovery_s"] is None or 0 <= cycle["guest_recovery_s"] <= 0.5
    assert {cycle["measured_by"][k] for k in ("guest_lost_s", "guest_recovery_s")} == {"the emulated bus observer"}
    assert second["guest_lost_s"] == {k: cycle["guest_lost_s"] for k in ("p50", "p99", "max")}
    assert "guest lost p50" in cli("update", "--last").stdout
    # With the agent gone, its record on disk.
    from luvmm.liveupdate.emu.client import connect
    from luvmm.liveupdate.state import StateDir

    host = connect(StateDir(cli.state).socket)
    try:
        host.call({"op": "unit-stop", "name": "agent"})
    finally:
        host.close_connection()
    assert json.loads(cli("update", "--last", "--json").stdout)["cycles"] == second["cycles"]
    cli("vm", "stop", "a")
    cli("host", "stop")


def test_require_dma_continuity_refuses_up_front_what_would_reset_the_device(cli):
    cli("vm", "start", "a", *SMALL)
    assert json.loads(cli("update", "--require-dma-continuity", "--json").stdout)["cycles"][0]["dma_lost"] == 0
    pid = json.loads(cli("vm", "status", "a", "--json").stdout)["a"]["pid"]
    # A kernel whose VFIO file handler refuses the device (the agent's probe sees it): nothing is paused.
    cli("host", "faults", "preserve:vfio-pci-v1=fail")
    proc = cli("update", "--require-dma-continuity", status=exitcodes.FAILED)
    line = cli.error_line(proc)
    assert line.startswith("luvmm update: --require-dma-continuity: no DMA continuity for 0000:6a:01.0 (VFIO cdev")
    assert "nothing was paused" in line and proc.stdout == ""
    status = json.loads(cli("host", "status", "--json").stdout)
    assert status["kexec_count"] == 1
    assert json.loads(cli("vm", "status", "a", "--json").stdout)["a"]["pid"] == pid  # the same VMM runs on
    cli("host", "faults", "--clear")
    cli("host", "stop")
    # A kernel that resets the device at the freeze: refused too; without the option the update is exit 4,
    # and so is its report afterwards.
    cli("host", "start", "--kernel-profile", "reset-on-freeze")
    proc = cli("update", "--require-dma-continuity", status=exitcodes.FAILED)
    assert "reset-on-freeze" in cli.error_line(proc)
    cli("update", status=exitcodes.DEVICE_RESET)
    proc = cli("update", "--last", status=exitcodes.DEVICE_RESET)
    assert "the kernel reset the device" in proc.stderr
    cli("vm", "stop", "a")
    cli("host", "stop")


# --- a real host's update, in order, against the emulated host's agent -------------------------------------


@pytest.fixture
def real_update(vm_host, monkeypatch):
    """`luvmm update --host real` in-process on the state dir of an emulated
    host with a VM, kexec_file_load stood in for: what it was asked, in order."""
    from luvmm.liveupdate import kexec
    from tests.support.vms import start_vm

    state, conn = vm_host
    start_vm(state, conn, "a")
    monkeypatch.setenv("LUVMM_RUNTIME_DIR", state.path)  # the emulated agent's socket is in its state dir
    calls = []
    monkeypatch.setattr(kexec, "load_kernel", lambda image, **kw: calls.append(("load", image, kw)))
    monkeypatch.setattr(kexec, "unload_kernel", lambda: calls.append(("unload",)))
    from luvmm.liveupdate import update

    ask = update.update_once

    def update_once(*a, **kw):
        calls.append(("ask",))
        return ask(*a, **kw)

    monkeypatch.setattr(update, "update_once", update_once)
    return state, conn, calls


def test_a_real_host_update_loads_the_kernel_first_and_unloads_it_when_rolled_back(real_update, capsys):
    from luvmm.cli import main
    from tests.support.vms import inject

    state, conn, calls = real_update
    argv = ["update", "--host", "real", "--state-dir", state.path, "--kernel", "/boot/next", "--initrd", "/boot/i"]
    inject(conn, "freeze:memfd-v1=fail")  # the reboot fails: the agent resumes the VM
    assert main(argv + ["--append", "console=ttyS0"]) == exitcodes.FAILED
    assert calls == [("load", "/boot/next", {"initrd": "/boot/i", "cmdline": "console=ttyS0",
                                             "reuse_cmdline": False}), ("ask",), ("unload",)]
    out = capsys.readouterr()
    assert "rebooting into /boot/next" in out.out and "update failed: kexec failed" in out.err, out
    inject(conn, clear=True)
    calls.clear()
    assert main(argv) == exitcodes.OK  # the emulated kexec returns: this process outlives it here
    assert calls == [("load", "/boot/next", {"initrd": "/boot/i", "cmdline": None, "reuse_cmdline": True}),
                     ("ask",)]
    out = capsys.readouterr().out
    assert out.startswith("update ") and "1 VM(s) prepared, rebooting into /boot/next" in out.splitlines()[0]
