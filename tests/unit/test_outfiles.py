"""Files luvmm writes where a user says (issue 24, item 3): never through a
symlink planted there, never in a directory someone else may swap things in."""

import os

import pytest

from luvmm.outfiles import UnsafeOutput, check_dir, check_file, open_dir, write_file, write_in

NOBODY = 65534


def test_a_symlink_planted_in_the_report_dir_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    report = tmp_path / "report"
    report.mkdir()
    (report / "index.html").symlink_to(victim)
    fd = open_dir(str(report))
    try:
        write_in(fd, "index.html", b"<html>")
    finally:
        os.close(fd)
    assert victim.read_text() == "precious\n"
    assert not (report / "index.html").is_symlink() and (report / "index.html").read_bytes() == b"<html>"
    assert sorted(os.listdir(report)) == ["index.html"]  # no temporary file left


def test_a_json_file_that_is_a_symlink_is_replaced_whole(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    out = tmp_path / "out.json"
    out.symlink_to(victim)
    check_file(str(out))
    write_file(str(out), b"{}\n")
    assert victim.read_text() == "precious\n" and out.read_bytes() == b"{}\n" and not out.is_symlink()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory another user owns needs root")
def test_a_directory_another_user_owns_or_may_write_into_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(UnsafeOutput, match=f"belongs to uid {NOBODY}"):
        check_dir(str(theirs))
    with pytest.raises(UnsafeOutput, match=f"belongs to uid {NOBODY}"):
        check_file(str(theirs / "out.json"))
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    os.chmod(open_to_all, 0o777)
    with pytest.raises(UnsafeOutput, match="others may write into it"):
        check_dir(str(open_to_all))
    os.chmod(open_to_all, 0o1777)  # sticky, as /tmp: nobody else can rename over what is ours
    check_dir(str(open_to_all))


def test_a_symlink_as_the_directory_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UnsafeOutput, match="is a symlink: give the directory itself"):
        check_dir(str(tmp_path / "link"))
    with pytest.raises(UnsafeOutput, match="is a symlink"):
        open_dir(str(tmp_path / "link"), create=True)
    check_dir(str(tmp_path / "not-yet"))  # one it would make is fine
    assert not (tmp_path / "not-yet").exists()
