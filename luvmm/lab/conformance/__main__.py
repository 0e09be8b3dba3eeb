"""Inside the lab guest: run the conformance cases on the real kernel and
save them (``conformance.json`` in the shared directory).

    python -m luvmm.lab.conformance [AREA ...]
"""

from __future__ import annotations

import sys

from luvmm.host import RealHost
from luvmm.lab import conformance, guest


def main(argv: list[str]) -> int:
    areas = tuple(argv) or conformance.AREAS
    guest.save("conformance.json", conformance.run(RealHost(), guest.devices(), "real", areas))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
