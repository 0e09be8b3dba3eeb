"""A unit for tests/emulated/test_fdstore.py: its first process leaves a memfd (and
meta) in the unit's fd store and dies; the process init starts next takes
them back and writes what it found to $FDSTORE_OUT."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from luvmm.liveupdate import fdstore  # noqa: E402


def main() -> int:
    out = os.environ["FDSTORE_OUT"]
    if os.environ.get("LUVMM_BOOT") != "restart":
        memfd = os.memfd_create("guest-ram")
        os.write(memfd, b"what the dead process wrote")
        files = {"ram": memfd}
        for i in range(int(os.environ.get("FDSTORE_EXTRA", "0"))):
            files[f"extra{i}"] = os.memfd_create(f"extra{i}")
        try:
            fdstore.store(files, {"pid": os.getpid()})
        except OSError as e:
            print(f"cannot store: {e}", file=sys.stderr)
        os.kill(os.getpid(), 9)  # dies at once: what it sent just before must still count
    stored = fdstore.take()
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        if stored is None:
            json.dump({"stored": None}, f)
        else:
            report(f, *stored)
    os.replace(tmp, out)
    import signal

    signal.pause()  # stays up, as a VMM does, until its unit is stopped
    return 0


def report(f, meta, fds):
    json.dump({"stored": True, "meta": meta, "names": sorted(fds), "ram": os.pread(fds["ram"], 64, 0).decode(),
               "fds": sorted(fds.values()), "env": {k: os.environ.get(k) for k in ("LISTEN_FDS", "LISTEN_PID")},
               "pid": os.getpid()}, f)


if __name__ == "__main__":
    sys.exit(main())
