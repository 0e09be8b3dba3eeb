"""The emulated host (only for machines without a real one; the product never
imports it): the daemon (``daemon``) that is the machine (``machine``: the
hardware of luvmm.devices.emu, never rebooted), its kernel (``kernel``: VFIO cdev,
iommufd, LUO, memfd preservation and KHO, rebuilt at every kexec) and its
init (``init``: units, restarts, the fd store); the bus observer
(``observer``), fault injection (``faults``), starting and stopping a host
(``hostctl``), and the client that is the emulated implementation of
luvmm.host.Host (``client``)."""
