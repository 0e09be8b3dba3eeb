"""Fault injection in the emulated host (off unless asked for).

``LUVMM_FAULTS`` holds comma-separated faults, e.g. ``kho=corrupt``:

* ``kho=corrupt`` flips a byte of the KHO image the old kernel hands over;
* ``kho=truncate`` cuts the image in half;
* ``freeze=COMPATIBLE`` makes the freeze callback of that LUO file handler
  (``memfd-v1``, ``vfio-pci-v1``, ``iommufd-v1``) fail with EIO, after the
  files frozen before it: the kernel must unfreeze them and the kexec fail.

The new kernel must refuse such an image with a message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Faults:
    kho: str | None = None
    freeze: str | None = None

    @classmethod
    def from_env(cls) -> "Faults":
        faults = cls()
        for item in filter(None, os.environ.get("LUVMM_FAULTS", "").split(",")):
            key, _, value = item.partition("=")
            if key == "kho" and value in ("corrupt", "truncate"):
                faults.kho = value
            elif key == "freeze" and value:
                faults.freeze = value
            else:
                raise ValueError(f"unknown fault {item!r}")
        return faults

    def kho_image(self, image: bytes) -> bytes:
        if self.kho == "corrupt":
            broken = bytearray(image)
            broken[len(broken) // 2] ^= 0xFF
            return bytes(broken)
        if self.kho == "truncate":
            return image[: len(image) // 2]
        return image
