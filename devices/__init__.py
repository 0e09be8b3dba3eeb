"""PCI passthrough: the VFIO cdev and iommufd uAPI and their typed handles,
and (with the emulated host) the emulated hardware behind them."""
