"""A real host's units (luvmm/wiring/systemd.py, `luvmm host install`, SystemdUnits):
the generated files and what systemd makes of them (systemd-analyze verify,
where it is installed), the install command as a user runs it, and
SystemdUnits against a fake systemctl -- a real process that records its
argv and prints what systemctl would."""

import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

from luvmm.liveupdate import state as unit_state
from luvmm import exitcodes
from luvmm.wiring import systemd
from luvmm.services import SystemdUnits

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def directives(text: str) -> dict[str, list[str]]:
    """Key -> its values, in order (comments and section headers left out)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def sections(text: str) -> dict[str, dict[str, list[str]]]:
    out, current = {}, None
    for line in text.splitlines():
        if line.startswith("["):
            current = out.setdefault(line.strip("[]"), {})
        elif line and not line.startswith("#"):
            key, value = line.split("=", 1)
            current.setdefault(key, []).append(value)
    return out


def cli(*args, check=True):
    done = subprocess.run([sys.executable, "-m", "luvmm", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    if check:
        assert done.returncode == 0, done.stderr
    return done


# --- the files ------------------------------------------------------------------------------------


def test_the_files_are_the_agent_the_vm_template_and_the_target():
    assert sorted(systemd.unit_files()) == ["luvmm-agent.service", "luvmm-vm@.service", "luvmm.target"]


@pytest.mark.parametrize("unit", ["luvmm-agent.service", "luvmm-vm@.service"])
def test_restart_policy_and_limits_are_the_emulated_inits(unit):
    s = sections(systemd.unit_files()[unit])
    service = s["Service"]
    assert service["Restart"] == ["on-failure"]
    assert service["RestartPreventExitStatus"] == ["78"]  # EX_CONFIG: a VM that cannot start is not looped
    assert service["KillMode"] == ["control-group"]
    assert s["Unit"]["StartLimitBurst"] == ["0"] and s["Unit"]["StartLimitIntervalSec"] == ["0"]  # never given up
    assert service["RestartMaxDelaySec"] == [f"{round(unit_state.RESTART_MAX_DELAY_S * 1000)}ms"]
    first = float(service["RestartSec"][0].removesuffix("ms")) / 1000
    steps = int(service["RestartSteps"][0])
    # doubling from the first delay reaches the maximum in RestartSteps steps
    assert first * 2 ** (steps - 1) < unit_state.RESTART_MAX_DELAY_S <= first * 2 ** steps
    assert s["Unit"]["DefaultDependencies"] == ["no"]
    assert "local-fs.target" in s["Unit"]["After"][0].split()
    assert service["StateDirectory"] == ["luvmm"] and service["StateDirectoryMode"] == ["0700"]
    assert service["RuntimeDirectory"] == ["luvmm"] and service["RuntimeDirectoryMode"] == ["0700"]
    assert service["RuntimeDirectoryPreserve"] == ["yes"]
    assert s["Install"]["WantedBy"] == ["luvmm.target"]


def test_an_older_systemd_gets_a_fixed_restart_delay_and_no_unknown_directive():
    for unit in ("luvmm-agent.service", "luvmm-vm@.service"):
        d = directives(systemd.unit_files(252)[unit])
        assert not {"RestartSteps", "RestartMaxDelaySec", "FileDescriptorStorePreserve"} & set(d)
        assert d["RestartSec"] == [f"{round(systemd.RESTART_FIXED_DELAY_S * 1000)}ms"]
    assert "FileDescriptorStorePreserve" in directives(systemd.unit_files(254)["luvmm-vm@.service"])


def test_the_vm_unit_keeps_its_files_in_its_fd_store_through_a_restart_only():
    from luvmm.vmm.manage import FDSTORE_MAX

    d = directives(systemd.unit_files()["luvmm-vm@.service"])
    assert d["FileDescriptorStoreMax"] == [str(FDSTORE_MAX)]
    assert d["NotifyAccess"] == ["main"]  # sd_notify FDSTORE=1 is refused from a unit with NotifyAccess=none
    # kept while the unit restarts, flushed when it stops (as the emulated init does): not "yes"
    assert d["FileDescriptorStorePreserve"] == ["restart"]
    assert d["Type"] == ["exec"]  # not notify: the agent, ordered after it, would wait for READY=1
    assert "FileDescriptorStoreMax" not in directives(systemd.unit_files()["luvmm-agent.service"])


def test_the_vmms_come_before_the_agent_which_yields_its_cpu_during_the_boot():
    vm = sections(systemd.unit_files()["luvmm-vm@.service"])
    agent = sections(systemd.unit_files()["luvmm-agent.service"])
    assert vm["Unit"]["Before"][0] == "luvmm-agent.service" and vm["Unit"]["Wants"] == ["luvmm-agent.service"]
    assert int(agent["Service"]["StartupCPUWeight"][0]) < 100  # a VMM has the default weight
    assert agent["Install"]["Also"] == ["luvmm.target"]  # enabling the agent enables the target
    target = sections(systemd.unit_files()["luvmm.target"])
    assert target["Install"]["WantedBy"] == ["multi-user.target"] and target["Unit"]["Wants"] == ["luvmm-agent.service"]


def test_the_units_tell_their_name_for_unit_boot():
    assert "LUVMM_UNIT=agent" in directives(systemd.unit_files()["luvmm-agent.service"])["Environment"]
    assert "LUVMM_UNIT=vm-%i" in directives(systemd.unit_files()["luvmm-vm@.service"])["Environment"]


def split_exec(line: str) -> list[str]:
    """An ExecStart= line's words, as systemd splits them (the quoting used here: double quotes, C escapes)."""
    import shlex

    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(line)]


@pytest.mark.parametrize("unit,module,args", [
    ("luvmm-agent.service", "luvmm.wiring.agent", ["--host", "real", "--state-dir", "/var/lib/luvmm"]),
    ("luvmm-vm@.service", "luvmm.vmm.process", ["--host", "real", "--state-dir", "/var/lib/luvmm", "--name", "%i"]),
])
def test_exec_start_runs_the_emulated_hosts_entry_point_lean(unit, module, args):
    argv = split_exec(directives(systemd.unit_files()[unit])["ExecStart"][0])
    expected, _ = unit_state.python_unit(module, *args)
    assert argv == expected
    assert argv[:3] == [sys.executable, "-S", "-c"]  # no site, no runpy
    assert "gc.disable()" in argv[3] and f"from {module} import main" in argv[3]
    assert unit_state.parse_unit_args(args, name_required=False) == {"host": "real", "state_dir": "/var/lib/luvmm",
                                                **({"name": "%i"} if "--name" in args else {})}


def test_quoting_escapes_specifiers_and_variables():
    assert systemd.quote("/usr/bin/python3") == "/usr/bin/python3"
    assert systemd.quote("a b") == '"a b"'
    assert systemd.quote('say "100%" $HOME') == '"say \\"100%%\\" $$HOME"'


def test_a_vm_units_cgroup_is_what_unit_of_reads(tmp_path):
    units = SystemdUnits()
    for leaf, name in [("luvmm-vm@web-1.service", "vm-web-1"), ("luvmm-agent.service", "agent"),
                       ("session-3.scope", None), ("luvmm-vm@.service", None)]:
        assert units.luvmm_name(leaf) == name
        if name:
            assert units.systemd_name(name) == leaf
    # the instance of the template luvmm-vm@.service for VM NAME
    assert SystemdUnits.systemd_name("vm-a.b_c") == "luvmm-vm@a.b_c.service"
    assert systemd.VM_TEMPLATE.replace("@", "@a.b_c") == "luvmm-vm@a.b_c.service"
    with pytest.raises(ValueError):
        units.systemd_name("vm-../x")
    with pytest.raises(ValueError):
        units.systemd_name("sshd")


# --- what systemd makes of them -------------------------------------------------------------------


@pytest.fixture
def analyze():
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed: the unit files cannot be verified here")
    return tool


def test_systemd_analyze_verify_accepts_them_without_a_warning(analyze, tmp_path):
    """verify loads the units as systemd would (it checks that ExecStart's
    binary exists: sys.executable), for the installed systemd's version."""
    version = systemd.systemd_version(shutil.which("systemctl") or "systemctl") or \
        int(subprocess.run([analyze, "--version"], capture_output=True, text=True).stdout.split()[1])
    files = systemd.unit_files(version)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "luvmm-vm@demo.service").write_text(files["luvmm-vm@.service"])  # an instance of the template
    units = ["./luvmm-agent.service", "./luvmm-vm@demo.service", "./luvmm.target"]
    done = subprocess.run([analyze, "verify", "--man=no", *units], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert [ln for ln in done.stderr.splitlines() if "luvmm" in ln] == []  # no unknown key, no missing binary
    # what systemd parsed: the instance name reaches the VMM's argv
    debug = subprocess.run([analyze, "verify", "--man=no", *units], cwd=tmp_path, capture_output=True, text=True,
                           timeout=60, env=dict(os.environ, SYSTEMD_LOG_LEVEL="debug")).stdout  # the units' dump
    assert "'--name', 'demo']))" in debug and "File Descriptor Store Max: 8" in debug


def test_systemd_analyze_verify_fails_a_missing_binary(analyze, tmp_path):
    """The check above is worth something: verify does refuse an ExecStart that cannot run."""
    (tmp_path / "luvmm-agent.service").write_text(
        systemd.unit_files(252)["luvmm-agent.service"].replace(sys.executable, str(tmp_path / "nopython")))
    done = subprocess.run([analyze, "verify", "--man=no", "./luvmm-agent.service"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "is not executable" in done.stderr


# --- a VM's metrics port: its socket unit ----------------------------------------------------------


METRICS = [{"name": "metrics", "listen": "127.0.0.1:9100"}]


def test_a_vms_metrics_port_is_a_socket_unit_the_template_takes_its_fds_from():
    """systemd binds the port and keeps it through the VMM's restarts (no
    moment for a local user to take it); the VMM gets it as ``metrics``."""
    assert directives(systemd.unit_files()["luvmm-vm@.service"])["Sockets"] == ["luvmm-vm@%i.socket"]
    files = systemd.vm_socket_files("demo", METRICS)
    assert list(files) == ["luvmm-vm@demo.socket"]
    unit = sections(files["luvmm-vm@demo.socket"])
    assert unit["Socket"]["ListenStream"] == ["127.0.0.1:9100"]
    assert unit["Socket"]["FileDescriptorName"] == ["metrics"]  # luvmm.liveupdate.fdstore.SOCKETS: never a stored file
    assert unit["Socket"]["Service"] == ["luvmm-vm@demo.service"] and unit["Socket"]["Accept"] == ["no"]
    assert unit["Socket"]["FreeBind"] == ["yes"] and unit["Socket"]["BindIPv6Only"] == ["ipv6-only"]
    assert unit["Socket"]["TriggerLimitIntervalSec"] == ["0"]  # never put into failure: that would close it
    # as early as the VMM after a kexec; closed once the VM is stopped, not at its restarts
    assert unit["Unit"]["DefaultDependencies"] == ["no"] and unit["Unit"]["StopWhenUnneeded"] == ["yes"]
    assert "Install" not in unit  # pulled in by the VM's service (Sockets= is Wants= and After=)


def test_a_socket_units_address_is_never_every_address_and_a_vm_without_one_has_none():
    def listen(spec):
        text = systemd.vm_socket_files("a", [{"name": "metrics", "listen": spec}])["luvmm-vm@a.socket"]
        return directives(text)["ListenStream"]

    assert listen("9100") == ["127.0.0.1:9100"]  # a port alone is loopback, as --metrics-port means it
    assert listen("0.0.0.0:9100") == ["0.0.0.0:9100"]
    assert listen("[::1]:9100") == ["[::1]:9100"]
    assert listen("[fe80::1%eth0]:9100") == ["[fe80::1%%eth0]:9100"]  # a scope, not a specifier
    assert systemd.vm_socket_files("a", []) == {}
    for bad in ([{"name": "a:b", "listen": "9100"}], [{"name": "metrics", "listen": "x"}]):
        with pytest.raises(ValueError):
            systemd.vm_socket_files("a", bad)
    with pytest.raises(ValueError):
        systemd.vm_socket_files("../a", METRICS)


def test_install_and_remove_a_vms_socket_unit(tmp_path):
    written = systemd.install_vm_sockets("demo", METRICS, str(tmp_path))
    where = tmp_path / "etc/systemd/system"
    assert written == [str(where / "luvmm-vm@demo.socket")]
    assert (where / "luvmm-vm@demo.socket").read_text() == systemd.vm_socket_files("demo", METRICS)[
        "luvmm-vm@demo.socket"]
    assert stat.S_IMODE((where / "luvmm-vm@demo.socket").stat().st_mode) == 0o644
    assert systemd.install_vm_sockets("plain", [], str(tmp_path)) == []
    assert systemd.remove_vm_sockets("demo", str(tmp_path)) is True
    assert systemd.remove_vm_sockets("demo", str(tmp_path)) is False
    assert list(where.iterdir()) == []


def test_systemd_analyze_verify_passes_the_socket_to_its_vm_and_a_vm_without_one_starts_all_the_same(
        analyze, tmp_path):
    version = int(subprocess.run([analyze, "--version"], capture_output=True, text=True).stdout.split()[1])
    template = systemd.unit_files(version)["luvmm-vm@.service"]
    (tmp_path / "luvmm-vm@demo.service").write_text(template)
    (tmp_path / "luvmm-vm@plain.service").write_text(template)  # a VM without a metrics port: no socket unit
    (tmp_path / "luvmm-vm@demo.socket").write_text(systemd.vm_socket_files("demo", METRICS)["luvmm-vm@demo.socket"])
    units = ["./luvmm-vm@demo.service", "./luvmm-vm@demo.socket", "./luvmm-vm@plain.service"]
    done = subprocess.run([analyze, "verify", "--man=no", *units], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert [ln for ln in done.stderr.splitlines() if "luvmm" in ln] == []
    debug = subprocess.run([analyze, "verify", "--man=no", *units], cwd=tmp_path, capture_output=True, text=True,
                           timeout=60, env=dict(os.environ, SYSTEMD_LOG_LEVEL="debug"))
    dump = debug.stdout + debug.stderr
    for line in ("Wants: luvmm-vm@demo.socket", "After: luvmm-vm@demo.socket", "TriggeredBy: luvmm-vm@demo.socket",
                 "Triggers: luvmm-vm@demo.service", "FileDescriptorName: metrics", "ListenStream: 127.0.0.1:9100"):
        assert line in dump, line


# --- luvmm host install ---------------------------------------------------------------------------


def test_install_writes_the_files_under_root(tmp_path):
    done = cli("host", "install", "--root", str(tmp_path))
    where = tmp_path / "etc/systemd/system"
    names = sorted(p.name for p in where.iterdir())
    assert names == ["luvmm-agent.service", "luvmm-vm@.service", "luvmm.target"]  # no temp file left
    for name in names:
        assert stat.S_IMODE((where / name).stat().st_mode) == 0o644
        assert f"wrote {where / name}\n" in done.stdout
    version = systemd.systemd_version()
    assert (where / "luvmm-vm@.service").read_text() == systemd.unit_files(version)["luvmm-vm@.service"]
    assert "daemon-reload" not in done.stdout  # not this host's systemd
    # installing again replaces them whole
    cli("host", "install", "--root", str(tmp_path), "--systemd-version", "255")
    assert "RestartSteps=" in (where / "luvmm-vm@.service").read_text()
    assert sorted(p.name for p in where.iterdir()) == names


def test_install_dry_run_prints_and_writes_nothing(tmp_path):
    done = cli("host", "install", "--root", str(tmp_path), "--dry-run", "--systemd-version", "255")
    assert list(tmp_path.iterdir()) == []
    assert f"# {tmp_path}/etc/systemd/system/luvmm-vm@.service\n" in done.stdout
    assert systemd.unit_files(255)["luvmm-agent.service"] in done.stdout


def test_install_where_it_cannot_write_says_so_in_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "etc").write_text("not a directory\n")  # refused even to root
    done = cli("host", "install", "--root", str(tmp_path), check=False)
    assert done.returncode == exitcodes.FAILED
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write the units" in lines[0], done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["etc"]
    if os.geteuid() != 0:  # a read-only directory stops only a user
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        done = cli("host", "install", "--root", str(ro), check=False)
        assert done.returncode == exitcodes.FAILED and len(done.stderr.strip().splitlines()) == 1
        assert list(ro.iterdir()) == []
    done = cli("host", "install", "--root", str(tmp_path / "none"), check=False)
    assert done.returncode == exitcodes.FAILED and "not a directory" in done.stderr


def test_install_leaves_no_temp_file_when_a_rename_fails(tmp_path, monkeypatch):
    where = tmp_path / "etc/systemd/system"
    where.mkdir(parents=True)
    (where / "luvmm.target").mkdir()  # os.replace of a file over a directory fails
    with pytest.raises(OSError):
        systemd.install(systemd.unit_files(), str(tmp_path))
    assert sorted(p.name for p in where.iterdir() if p.name.startswith(".")) == []


def test_install_help_says_what_it_writes():
    done = cli("host", "install", "--help")
    assert "luvmm-vm@.service" in done.stdout and "--dry-run" in done.stdout


# --- SystemdUnits against a fake systemctl --------------------------------------------------------


SHOW = textwrap.dedent("""\
    Id=luvmm-agent.service
    LoadState=loaded
    ActiveState=active
    SubState=running
    MainPID=101
    ExecMainCode=0
    ExecMainStatus=0
    NRestarts=2

    Id=luvmm-vm@web.service
    LoadState=loaded
    ActiveState=failed
    SubState=failed
    MainPID=0
    ExecMainCode=1
    ExecMainStatus=78
    NRestarts=0

    Id=luvmm-vm@db.service
    LoadState=loaded
    ActiveState=activating
    SubState=auto-restart
    MainPID=0
    ExecMainCode=2
    ExecMainStatus=9
    NRestarts=5
    """)


@pytest.fixture
def fake_systemctl(tmp_path):
    """A systemctl that appends its argv to a log, prints $FAKE_OUT's file and exits $FAKE_RC."""
    script = tmp_path / "systemctl"
    log = tmp_path / "argv.log"
    out = tmp_path / "out.txt"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        printf '%s\\n' "$*" >> {log}
        code=$(cat {tmp_path}/rc 2>/dev/null || echo 0)
        if [ "$code" != 0 ]; then echo "Failed to $1 $3: Unit $3 not found." >&2; exit "$code"; fi
        cat {out} 2>/dev/null
        exit 0
        """))
    script.chmod(0o755)

    class Fake:
        units = SystemdUnits([str(script)])

        @staticmethod
        def argv():
            return log.read_text().splitlines() if log.exists() else []

        @staticmethod
        def prints(text):
            out.write_text(text)

        @staticmethod
        def fails(code):
            (tmp_path / "rc").write_text(str(code))

    return Fake


def test_start_and_stop_enable_and_disable_the_systemd_unit(fake_systemctl):
    units = fake_systemctl.units
    assert units.start("vm-web") == {"name": "vm-web", "unit": "luvmm-vm@web.service"}
    assert units.stop("agent")["unit"] == "luvmm-agent.service"
    assert fake_systemctl.argv() == ["enable --now luvmm-vm@web.service", "disable --now luvmm-agent.service"]


def test_list_parses_systemctl_show(fake_systemctl):
    fake_systemctl.prints(SHOW + "\nId=luvmm-vm@gone.service\nLoadState=not-found\nMainPID=0\n")
    got = {u["name"]: u for u in fake_systemctl.units.list()}
    assert fake_systemctl.argv() == ["show --property=Id,LoadState,ActiveState,SubState,MainPID,ExecMainCode,"
                                     "ExecMainStatus,NRestarts -- luvmm-agent.service luvmm-vm@*.service"]
    assert sorted(got) == ["agent", "vm-db", "vm-web"]
    assert got["agent"] == {"name": "agent", "unit": "luvmm-agent.service", "pid": 101, "running": True,
                            "returncode": None, "restarts": 2, "state": "active/running"}
    assert (got["vm-web"]["running"], got["vm-web"]["returncode"], got["vm-web"]["pid"]) == (False, 78, None)
    assert got["vm-db"]["returncode"] == -9 and got["vm-db"]["restarts"] == 5  # killed by SIGKILL, as Popen says


def test_a_failing_systemctl_is_an_oserror_saying_why(fake_systemctl):
    fake_systemctl.fails(5)
    with pytest.raises(OSError) as e:
        fake_systemctl.units.start("vm-web")
    assert e.value.errno == 2  # ENOENT: no such unit
    assert e.value.strerror == "systemctl enable --now luvmm-vm@web.service: " \
                               "Failed to enable luvmm-vm@web.service: Unit luvmm-vm@web.service not found."
    fake_systemctl.fails(1)
    with pytest.raises(OSError) as e:
        fake_systemctl.units.stop("vm-web")
    assert e.value.errno == 5  # EIO


def test_no_systemctl_is_an_oserror_too(tmp_path):
    with pytest.raises(OSError) as e:
        SystemdUnits([str(tmp_path / "nowhere")]).list()
    assert e.value.errno == 2 and "systemd host" in e.value.strerror


def test_services_are_not_importing_subprocess_at_import():
    code = "import sys, luvmm.services; print('subprocess' in sys.modules)"
    out = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {ROOT!r}); {code}"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- how a unit knows how it was started ----------------------------------------------------------


def test_unit_boot(tmp_path, monkeypatch):
    for name in ("LUVMM_BOOT", "RUNTIME_DIRECTORY", "LUVMM_UNIT", "LISTEN_FDS", "LISTEN_PID"):
        monkeypatch.delenv(name, raising=False)
    assert unit_state.unit_boot() == "cold"  # no init says anything
    monkeypatch.setenv("LUVMM_BOOT", "restart")
    assert unit_state.unit_boot() == "restart"  # the emulated init's word
    monkeypatch.delenv("LUVMM_BOOT")
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("LUVMM_UNIT", "vm-web")
    assert unit_state.unit_boot() == "kexec"  # first start in this boot: look for an incoming session
    assert (tmp_path / "vm-web.started").exists()
    assert unit_state.unit_boot() == "restart"  # ran already in this boot
    monkeypatch.setenv("LUVMM_UNIT", "agent")
    monkeypatch.setenv("LISTEN_FDS", "3")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    assert unit_state.unit_boot() == "restart"  # systemd passed the fd store
    assert not (tmp_path / "agent.started").exists()
    monkeypatch.setenv("LISTEN_PID", "1")
    assert unit_state.unit_boot() == "kexec"  # not for us
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "missing"))
    monkeypatch.setenv("LUVMM_UNIT", "vm-x")
    assert unit_state.unit_boot() == "cold"


@pytest.mark.parametrize("vm", ["a", "a.b_c-1", "-a", ".a", "a/b", "x" * 63, "x" * 64, "a b", "", "é"])
def test_systemd_units_take_the_vm_names_check_vm_name_takes(vm):
    try:
        valid = bool(unit_state.check_vm_name(vm))
    except ValueError:
        valid = False
    try:
        named = SystemdUnits.systemd_name("vm-" + vm) == f"luvmm-vm@{vm}.service"
    except ValueError:
        named = False
    assert named == valid
