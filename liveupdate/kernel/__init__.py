"""The emulated kernel: VFIO cdev, iommufd, LUO and KHO, rebuilt at every kexec.

It mirrors the real kernel's split -- :mod:`devices.kernel.vfio`,
:mod:`devices.kernel.iommufd`, :mod:`liveupdate.kernel.luo` and
:mod:`liveupdate.kernel.memfd`, :mod:`liveupdate.kernel.kho` -- around
:mod:`liveupdate.kernel.core` (the file table, device nodes, the boot from a
KHO image and the freeze before a kexec).  Nothing in it survives a kexec
except what the KHO image carries.
"""
