"""A unit for `luvmm boot`'s init (tests/e2e/test_boot.py): it writes what
init gave it -- its environment, and what init's socket answers a unit --
to the report file named on its command line, and waits to be stopped."""

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from luvmm.services import InitClient, InitUnits  # noqa: E402


def errno_of(fn, *args) -> int | None:
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


def main() -> None:
    report = sys.argv[1]
    units = InitUnits(InitClient(os.environ["LUVMM_INIT_SOCKET"], timeout=10))
    found = {
        "pid": os.getpid(),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("LUVMM_", "NOTIFY_", "LISTEN_"))},
        "units": sorted(u["name"] for u in units.list()),  # anyone's
        "start_errno": errno_of(units.start, "agent"),  # the operator's only
        "unit_of_errno": errno_of(units.unit_of, os.getpid()),  # the agent's and the operator's
    }
    tmp = f"{report}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(found, f)
    os.replace(tmp, report)
    signal.pause()


if __name__ == "__main__":
    main()
