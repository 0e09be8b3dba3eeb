"""memfd preservation (mm/memfd_luo.c): conformance cases (luvmm.lab.conformance)."""

from __future__ import annotations
