"""A unit for the emulated host's init (tests/emulated/test_host_process.py): it sets up
DMA to a memfd it does *not* preserve, reports, and waits to be killed."""

import json
import os
import signal
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from luvmm.liveupdate.emu.client import connect  # noqa: E402
from tests.support.vfio_rig import VfioRig  # noqa: E402


def report(message: dict) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(os.environ["LUVMM_TEST_REPORT"])
        s.sendall(json.dumps(message).encode() + b"\n")


def main() -> None:
    boot = os.environ["LUVMM_BOOT"]
    host = connect(os.environ["LUVMM_HOST_SOCKET"])
    if boot == "cold":
        rig = VfioRig(host, size=4 << 20)
        rig.view[0x20000:0x20010] = b"not preserved!!!"
        report({"boot": boot, "pid": os.getpid(), "ram_inode": os.fstat(rig.memfd).st_ino})
    else:
        report({"boot": boot, "pid": os.getpid(), "generation": int(os.environ["LUVMM_GENERATION"])})
    signal.pause()


if __name__ == "__main__":
    main()
