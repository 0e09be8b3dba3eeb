"""The emulated hardware (only the emulated host uses it; the product never
imports it): a PCI Express function (``pci``), an Intel DSA on it (``dsa``,
its capabilities and BAR layout in ``dsa_model``), the IOMMU's translation
(``iommu``) and the machine's memory (``memory``); a port of the VFIO
selftests' DSA driver that drives it through the real handles
(``dsa_driver``), and the DSA benchmark (``dsa_bench``)."""
