"""A unit that is the VMM of VM "evil" and reaches for VM "a": its session,
its files, its device, its IOMMU objects.  Writes what each try got (an
errno, or "ok") as JSON to $EVIL_OUT, for tests/e2e/test_isolation.py."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from luvmm.devices.iommufd import IommuFd  # noqa: E402
from luvmm.devices.vfio import VfioDevice, cdev_path_for_bdf  # noqa: E402
from luvmm.liveupdate import fdstore  # noqa: E402
from luvmm.liveupdate.agent_client import AgentClient  # noqa: E402
from luvmm.liveupdate.state import StateDir  # noqa: E402
from luvmm.liveupdate.emu.client import connect  # noqa: E402


def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return e.errno


def escapes(state) -> dict:
    """What a process that tries to pass for the operator gets: a child that
    connects and exits, leaving its socket to its parent; and a grandchild
    that left the unit (new session, double fork)."""
    import socket

    got = {}
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child: connects, hands the connection up, exits
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(state.agent_socket)
        socket.send_fds(child, [b"x"], [s.fileno()])
        os._exit(0)
    _, fds, _, _ = socket.recv_fds(parent, 16, 1)
    os.waitpid(pid, 0)
    inherited = socket.socket(fileno=fds[0])
    from luvmm import rpc

    got["dead child's socket"] = attempt(lambda: rpc.call(inherited, {"op": "status"}))
    inherited.close()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if os.fork():
            os._exit(0)
        os.close(out_r)  # the grandchild: out of the unit's session, re-parented
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            pass
        result = attempt(lambda: AgentClient(state).call({"op": "status"}))
        os.write(out_w, str(result).encode())
        os._exit(0)
    os.close(out_w)
    os.waitpid(pid, 0)
    got["double-forked grandchild"] = int(os.read(out_r, 64) or b"0")
    os.close(out_r)
    return got


def main() -> None:
    state = StateDir(os.environ["LUVMM_STATE_DIR"])
    host = connect(os.environ["LUVMM_HOST_SOCKET"])
    victim, victim_bdf, victim_ioas = sys.argv[1], sys.argv[2], int(sys.argv[3])
    agent = AgentClient(state)
    memfd = os.memfd_create("evil")
    got = {}
    for op in ("retrieve-session", "create-session", "register", "resumed"):
        got[op] = attempt(lambda: agent.call({"op": op, "name": victim}))
    got["restored"] = attempt(lambda: agent.call({"op": "restored", "name": victim, "report": {"error": "x"}}))
    for op in ("update", "status", "abandon", "result"):  # the operator's
        got[f"agent {op}"] = attempt(lambda: agent.call({"op": op}))
    got["agent release"] = attempt(lambda: agent.call({"op": "release", "name": victim}))
    for op in ("unit-stop", "unit-start"):  # init's, the operator's
        got[f"host {op}"] = attempt(lambda: host.call({"op": op, "name": f"vm-{victim}"}))
    got["host faults"] = attempt(lambda: host.call({"op": "faults", "set": "freeze=fail"}))
    got["host kexec"] = attempt(lambda: host.call({"op": "kexec"}))
    got["host stop"] = attempt(lambda: host.call({"op": "stop"}))
    # Its own store (it has none: no FileDescriptorStoreMax), never VM a's.
    os.environ["NOTIFY_SOCKET"] = os.path.join(state.path, "notify.sock")
    got["fdstore"] = attempt(lambda: fdstore.store({"ram": memfd}, {"planted": True}))
    got.update(escapes(state))
    got["open /dev/liveupdate"] = attempt(lambda: host.open("/dev/liveupdate"))
    iommufd = IommuFd.open(host)
    # A cdev opens more than once (as on the kernel); binding it a second time does not.
    device = VfioDevice.open(host, cdev_path_for_bdf(host, victim_bdf))
    got["bind device"] = attempt(lambda: device.bind_iommufd(iommufd))
    got["reset device"] = attempt(device.reset)
    got["read device BAR0"] = attempt(lambda: device.read32(0, 0))
    got["destroy victim ioas"] = attempt(lambda: iommufd.destroy(victim_ioas))
    got["map victim ioas"] = attempt(lambda: iommufd.ioas_map_file(victim_ioas, memfd, 0, 4096, iova=0))
    own = iommufd.ioas_alloc()
    got["map a user VA"] = attempt(lambda: iommufd.ioas_map(own, 0x7F0000000000, 4096, iova=0))
    with open(os.environ["EVIL_OUT"], "w") as f:
        json.dump(got, f)


if __name__ == "__main__":
    main()
