"""The lab: a real LUO kernel under QEMU, where luvmm's real half is tested.

``luvmm lab build`` (:mod:`luvmm.lab.build`) builds a kernel with LUO, KHO,
memfd preservation, iommufd, the VFIO cdev, vfio-pci, intel-iommu and KVM --
Debian's ``linux-source-7.*`` by default, or the user's own tree -- with the
config fragment in ``luvmm/lab/config/lab.config`` over virtme-ng's minimal
config, and caches it with its uAPI headers and the upstream LUO selftests
built from the same tree.

``luvmm lab run -- CMD`` (:mod:`luvmm.lab.run`) boots it with virtme-ng under
QEMU: the host's filesystem is the guest's root, q35 with an intel-iommu
(interrupt remapping on), QEMU's ``edu`` PCI devices bound to vfio-pci, nested
KVM.  CMD runs in the guest (:mod:`luvmm.lab.guest`); a kexec inside the guest
boots the next stage, where CMD runs again.  Results leave the guest through a
shared directory.

Nothing here is imported by the product (vmm/, the handles, the agent), and
nothing here imports the emulated host.
"""

from __future__ import annotations

import os


class LabError(Exception):
    """A user-facing failure of the lab: printed as one line, exit status 1."""


def cache_dir() -> str:
    """Where lab kernels live: $LUVMM_LAB_CACHE, else $XDG_CACHE_HOME/luvmm/lab,
    else ~/.cache/luvmm/lab."""
    explicit = os.environ.get("LUVMM_LAB_CACHE")
    if explicit:
        return os.path.abspath(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "luvmm", "lab")


#: The repository's root (the directory holding luvmm/, vmm/, devices/ ...):
#: the guest runs this checkout's code.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")
LAB_CONFIG = os.path.join(CONFIG_DIR, "lab.config")

#: ``luvmm lab run``'s defaults.
DEFAULT_MEMORY = "2G"
DEFAULT_CPUS = 2
DEFAULT_TIMEOUT = 600.0
