"""The emulated kernel: VFIO cdev, iommufd, LUO and KHO, rebuilt at every kexec.

It mirrors the real kernel's split -- :mod:`luvmm.liveupdate.emu.kernel.vfio`,
:mod:`luvmm.liveupdate.emu.kernel.iommufd`, :mod:`luvmm.liveupdate.emu.kernel.luo` and
:mod:`luvmm.liveupdate.emu.kernel.memfd`, :mod:`luvmm.liveupdate.emu.kernel.kho` -- around
:mod:`luvmm.liveupdate.emu.kernel.core` (the file table, device nodes, the boot from a
KHO image and the freeze before a kexec).  Nothing in it survives a kexec
except what the KHO image carries.
"""

# The built-in subsystems and LUO file handlers: importing them registers
# them (register_subsystem, register_file_handler), as initcalls do.
from luvmm.liveupdate.emu.kernel import luo, memfd, iommufd, vfio  # noqa: E402,F401
from luvmm.liveupdate.emu.kernel.core import Kernel, KernelError  # noqa: E402,F401
