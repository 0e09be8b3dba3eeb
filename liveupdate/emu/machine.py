"""The emulated machine: the hardware under the emulated kernel.

It never reboots.  It owns the PCI functions (DSA devices, whose engines keep
running through a kexec), the IOMMU domains (hardware page tables, named by
an id the KHO image can refer to), and the physical memory: every memfd a
kernel object handed to the hardware, mapped once.  A kexec asks it to clear
Bus Master Enable on functions that are not preserved and to tear down the
domains and memory nobody preserved.
"""

from __future__ import annotations

import itertools
import os

from luvmm.devices.emu.dsa import DsaDevice
from luvmm.devices.emu.iommu import IommuDomain
from luvmm.devices.emu.memory import PhysMem
from luvmm.uapi.pci_regs import PCI_COMMAND_MASTER


#: DSA functions a machine may have (each is its own PCI function; a bus holds 32 devices).
MAX_DEVICES = 64


def bdf_of(i: int) -> str:
    """The i-th DSA's address: 0000:6a:01.0, 0000:6b:01.0, ... (as Sapphire Rapids
    puts one per bus), then further devices on each bus."""
    bus, dev = 0x6a + i % 0x80, 1 + i // 0x80
    return f"0000:{bus:02x}:{dev:02x}.0"


class Machine:
    def __init__(self, devices: int = 1, *, dsa_bandwidth: float | None = None):
        if not isinstance(devices, int) or not 1 <= devices <= MAX_DEVICES:
            raise ValueError(f"a machine has 1 to {MAX_DEVICES} devices, not {devices!r}")
        self.devices: dict[str, DsaDevice] = {}
        for i in range(devices):
            bdf = bdf_of(i)
            self.devices[bdf] = DsaDevice(bdf, bandwidth=dsa_bandwidth)
        self.domains: dict[int, IommuDomain] = {}
        self._domain_ids = itertools.count(1)
        self.memory: dict[tuple[int, int], PhysMem] = {}
        #: Pages held without a mapping: preserved memfds nobody DMAs into.
        self.held: dict[tuple[int, int], int] = {}

    def start(self) -> None:
        for dev in self.devices.values():
            dev.start()

    def shutdown(self) -> None:
        for dev in self.devices.values():
            dev.shutdown()
        for mem in self.memory.values():
            mem.close()
        self.memory.clear()
        for fd in self.held.values():
            os.close(fd)
        self.held.clear()

    # --- IOMMU ---------------------------------------------------------------------------

    def new_domain(self, name: str = "") -> tuple[int, IommuDomain]:
        domain_id = next(self._domain_ids)
        domain = IommuDomain(name or f"domain{domain_id}")
        self.domains[domain_id] = domain
        return domain_id, domain

    def free_domain(self, domain_id: int) -> None:
        domain = self.domains.pop(domain_id, None)
        if domain is None:
            return
        for dev in self.devices.values():
            if dev.domain is domain:
                dev.attach_domain(None)
        domain.clear()

    # --- memory ----------------------------------------------------------------------------

    def memory_for(self, fd: int) -> PhysMem:
        """The machine's mapping of the memfd behind ``fd`` (made on first use)."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        mem = self.memory.get(key)
        if mem is None:
            mem = self.memory[key] = PhysMem(fd)
        return mem

    def hold(self, fd: int) -> tuple[int, int]:
        """Keep the pages of the file behind ``fd`` (KHO preserves them)."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key not in self.held:
            self.held[key] = os.dup(fd)
        return key

    def pages(self, key: tuple[int, int]) -> int | None:
        """An fd on preserved pages (held or mapped), or None if they are gone."""
        if key in self.held:
            return self.held[key]
        mem = self.memory.get(key)
        return mem.fd if mem is not None else None

    def collect_memory(self, keep: set[tuple[int, int]]) -> None:
        """Free memory that neither a domain nor ``keep`` still references."""
        used = set(keep)
        for domain in self.domains.values():
            used |= {m.key for m in domain.memories()}
        for key in list(self.memory):
            if key not in used:
                self.memory.pop(key).close()
        for key in list(self.held):
            if key not in keep:
                os.close(self.held.pop(key))

    # --- kexec ------------------------------------------------------------------------------

    def reset_for_kexec(self, preserved_bdfs: set[str], preserved_domains: set[int],
                        preserved_memory: set[tuple[int, int]]) -> None:
        """What the hardware sees when the old kernel is gone: Bus Master Enable
        cleared on every function that is not preserved, non-preserved domains
        torn down, and memory that nobody preserved freed."""
        for bdf, dev in self.devices.items():
            if bdf not in preserved_bdfs:
                dev.set_command_bits(PCI_COMMAND_MASTER, False)
                for v in range(dev.msix.nvec):
                    dev.msix.set_eventfd(v, None)
        for domain_id in list(self.domains):
            if domain_id not in preserved_domains:
                self.free_domain(domain_id)
        self.collect_memory(preserved_memory)
