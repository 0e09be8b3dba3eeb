"""A unit that is the VMM of VM "evil" and reaches for VM "a": its session,
its files, its device, its IOMMU objects.  Writes what each try got (an
errno, or "ok") as JSON to $EVIL_OUT, for tests/test_isolation.py."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from devices.iommufd import IommuFd  # noqa: E402
from devices.vfio import VfioDevice, cdev_path_for_bdf  # noqa: E402
from liveupdate.agent_client import AgentClient  # noqa: E402
from liveupdate.state import StateDir  # noqa: E402
from luvmm.emuhost import connect  # noqa: E402


def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return e.errno


def main() -> None:
    state = StateDir(os.environ["LUVMM_STATE_DIR"])
    host = connect(os.environ["LUVMM_HOST_SOCKET"])
    victim, victim_bdf, victim_ioas = sys.argv[1], sys.argv[2], int(sys.argv[3])
    agent = AgentClient(state)
    memfd = os.memfd_create("evil")
    got = {}
    for op in ("retrieve-session", "create-session", "fetch-fds", "drop-fds", "register", "resumed"):
        got[op] = attempt(lambda: agent.call({"op": op, "name": victim}))
    got["store-fds"] = attempt(lambda: agent.call({"op": "store-fds", "name": victim, "tokens": ["ram"]}, [memfd]))
    got["restored"] = attempt(lambda: agent.call({"op": "restored", "name": victim, "report": {"error": "x"}}))
    got["own fetch-fds"] = attempt(lambda: agent.call({"op": "fetch-fds", "name": "evil"}))
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
