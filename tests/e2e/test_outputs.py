"""What the CLI writes where a user says (issue 24, item 3), as the issue's
red team tried it: another user's directory with symlinks planted in it.
The real CLI; the ``cli`` fixture checks nothing is left."""

import os

import pytest

from luvmm import exitcodes

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a directory another user owns needs root to make")


def planted(cli, names):
    """DIR, made and owned by another user, each of ``names`` in it a symlink to a file of root's."""
    victim = os.path.join(cli.root, "victim")
    with open(victim, "w") as f:
        f.write("precious\n")
    theirs = os.path.join(cli.root, "theirs")
    os.mkdir(theirs)
    for name in names:
        os.symlink(victim, os.path.join(theirs, name))
    os.chown(theirs, NOBODY, NOBODY)
    cli.keep(victim)
    cli.keep(theirs)
    for name in names:
        cli.keep(os.path.join(theirs, name))
    return theirs, victim


def test_the_demo_refuses_a_report_dir_another_user_owns_before_it_runs(cli):
    theirs, victim = planted(cli, ["index.html", "summary.json", "phases.png"])
    proc = cli("demo", "--report", theirs, "--cycles", "1", status=exitcodes.USAGE)
    assert cli.error_line(proc) == (f"luvmm demo: --report {theirs}: {theirs} belongs to uid {NOBODY}, not to you "
                                    "(uid 0): its owner could swap what luvmm writes there")
    assert open(victim).read() == "precious\n"
    assert not os.path.exists(cli.state)  # refused before anything started


def test_json_output_into_another_users_directory_is_refused(cli):
    theirs, victim = planted(cli, ["out.json"])
    proc = cli("update", "--last", "--json", os.path.join(theirs, "out.json"), status=exitcodes.USAGE)
    assert f"belongs to uid {NOBODY}" in cli.error_line(proc)
    assert open(victim).read() == "precious\n"
