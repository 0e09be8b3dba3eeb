"""luvmm.liveupdate.boot without starting an init: how its units are told they
started (the kernel's boot_id against the one recorded), one init per state
dir (the pidfile's lock), and an init that cannot start leaving nothing."""

import os

import pytest

from luvmm.liveupdate import boot
from luvmm.liveupdate.state import StateDir


@pytest.fixture
def state(tmp_path):
    s = StateDir(str(tmp_path / "state"))
    s.ensure()
    return s


def boot_id(tmp_path, value: str) -> str:
    path = tmp_path / "boot_id"
    path.write_text(value + "\n")  # as /proc/sys/kernel/random/boot_id reads
    return str(path)


def test_the_first_init_of_a_boot_is_a_kexec_one_and_a_later_one_in_it_cold(state, tmp_path):
    first = boot.read_boot_id(boot_id(tmp_path, "1b6e2a3c-0000-4000-8000-000000000001"))
    assert first == "1b6e2a3c-0000-4000-8000-000000000001"
    assert boot.boot_kind(state, first) == "kexec"  # nothing recorded: a fresh boot
    assert boot.boot_kind(state, first) == "kexec"  # deciding records nothing
    boot.record_boot(state, first)
    assert boot.boot_kind(state, first) == "cold"  # started again in the same boot
    later = boot.read_boot_id(boot_id(tmp_path, "1b6e2a3c-0000-4000-8000-000000000002"))
    assert boot.boot_kind(state, later) == "kexec"  # the kernel booted since (a kexec, or a cold boot)


def test_a_damaged_record_means_a_kexec_boot(state):
    state.write_file("boot.id", b"\xff\xfe not an id")
    assert boot.boot_kind(state, "1b6e2a3c-0000-4000-8000-000000000001") == "kexec"


def test_one_init_per_state_dir_by_the_pidfiles_lock(state):
    assert boot.running(state) is None
    fd = boot.lock(state)
    try:
        assert boot.running(state) == os.getpid()
        with pytest.raises(boot.AlreadyRunning, match=f"already runs in {state.path} \\(pid {os.getpid()}\\)"):
            boot.lock(state)  # another open file description: refused, as another process would be
        with pytest.raises(boot.AlreadyRunning):
            boot.clean(state)
    finally:
        boot.unlock(state, fd)
    assert boot.running(state) is None and not os.path.exists(boot.pidfile(state))


def test_a_pidfile_nobody_holds_is_no_init(state):
    """What an init killed (or the kernel before a kexec) left: a pid, no lock."""
    state.write_file("boot.pid", b"1\n")
    assert boot.running(state) is None
    fd = boot.lock(state)
    assert open(boot.pidfile(state)).read() == f"{os.getpid()}\n"
    boot.unlock(state, fd)


def test_an_init_that_cannot_read_the_boot_id_says_why_and_leaves_nothing(state, tmp_path):
    said = []
    assert boot.serve(state, ready=said.append, boot_id_path=str(tmp_path / "no-boot-id")) == 1
    assert len(said) == 1 and said[0].startswith("error cannot read the kernel's boot id")
    assert sorted(os.listdir(state.path)) == [".luvmm-state", "logs", "units"]


def test_the_agent_unit_is_written_once_for_the_real_host(state):
    assert boot.agent_unit(state)
    unit = next(u for u in state.read_units() if u["name"] == "agent")
    assert unit["restart"] == "on-failure" and unit["pdeathsig"] == "self" and unit["start_limit_burst"] == 0
    assert "'--host', 'real'" in unit["argv"][-1]
    state.write_unit("agent", ["/bin/true"])  # the operator's own stays
    assert not boot.agent_unit(state)
    assert next(u for u in state.read_units() if u["name"] == "agent")["argv"] == ["/bin/true"]


def test_a_real_hosts_units_are_luvmm_boots_init_where_it_started_them_else_systemd(state, monkeypatch):
    from luvmm.services import InitUnits, SystemdUnits
    from luvmm.wiring import connect, real_units

    monkeypatch.setenv("LUVMM_INIT_SOCKET", state.init_socket)
    units = connect("real")[1].units
    assert isinstance(units, InitUnits) and units.client.path == state.init_socket
    monkeypatch.delenv("LUVMM_INIT_SOCKET")
    assert isinstance(connect("real")[1].units, SystemdUnits)
    state.write_file("init.sock", b"")  # a file where no init answers: not an init
    assert isinstance(real_units(state), SystemdUnits)


def test_boots_default_state_dir_is_the_systemd_units_one():
    from luvmm.cli.boot import DEFAULT_STATE_DIR
    from luvmm.wiring.systemd import STATE_DIR

    assert DEFAULT_STATE_DIR == STATE_DIR


def test_a_state_dir_that_cannot_be_made_is_one_line_with_a_hint_for_a_user(monkeypatch, capsys, tmp_path):
    from luvmm.cli import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    where = tmp_path / "none" / "state"
    assert main(["boot", "--state-dir", str(where)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"luvmm boot: cannot use {where} as a state dir")
    assert "runs as root; or give --state-dir" in err[0]
    assert not where.parent.exists()
