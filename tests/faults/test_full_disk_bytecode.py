"""A full disk never poisons a unit's bytecode cache (issue 24, item 2):
CPython's own cache writer renames a truncated .pyc into place when the
disk fills under it, and every later import of that module fails
("EOFError: marshal data too short") -- a VMM restarted for ever.  Units
(luvmm.liveupdate.state.python_unit) write it whole or not at all."""

import os
import shutil
import subprocess

import pytest

from luvmm.liveupdate.state import python_unit

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"),
                                reason="a full disk of its own (a small tmpfs) needs root")


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk, leave: int) -> str:
    """Fill ``disk`` but for ``leave`` bytes; the filler's path."""
    filler = str(disk / "filler")
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    size = os.path.getsize(filler)
    os.truncate(filler, max(0, size - leave))
    return filler


def test_a_unit_on_a_full_disk_caches_no_truncated_bytecode(tmp_path, small_disk):
    src = tmp_path / "src"
    src.mkdir()
    (src / "bigmod.py").write_text("DATA = [\n" + "".join(f"    'value {i:06d}',\n" for i in range(20000)) + "]\n")
    (src / "probe.py").write_text("def main(args):\n    if args:\n        import bigmod\n"
                                  "        print(len(bigmod.DATA))\n    return 0\n")
    argv, env = python_unit("probe", "bigmod")
    env = dict({k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}, **env,
               PYTHONPATH=str(src), PYTHONPYCACHEPREFIX=str(small_disk / "pycache"))

    def run(argv=argv):
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)

    warm, _ = python_unit("probe")  # everything cached but bigmod
    assert run(warm).returncode == 0
    filler = fill(small_disk, leave=64 << 10)  # room for part of bigmod's .pyc (~300 KiB), not all of it
    first = run()
    assert (first.returncode, first.stdout) == (0, "20000\n"), first.stderr
    cached = [os.path.join(d, f) for d, _, fs in os.walk(small_disk / "pycache") for f in fs if "bigmod" in f]
    assert cached == [], cached  # not written at all: no room for it whole
    os.unlink(filler)
    for _ in range(2):  # cached now, then read from the cache
        again = run()
        assert (again.returncode, again.stdout) == (0, "20000\n"), again.stderr
    cached = [os.path.join(d, f) for d, _, fs in os.walk(small_disk / "pycache") for f in fs if "bigmod" in f]
    assert len(cached) == 1 and os.path.getsize(cached[0]) > 100 << 10
