"""The VFIO cdev and vfio-pci (drivers/vfio): conformance cases (luvmm.lab.conformance)."""

from __future__ import annotations
