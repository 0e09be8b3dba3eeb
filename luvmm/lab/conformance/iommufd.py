"""iommufd (drivers/iommu/iommufd): conformance cases (luvmm.lab.conformance)."""

from __future__ import annotations
