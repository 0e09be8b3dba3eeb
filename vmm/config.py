"""A VM's configuration (``vms/NAME/config.json``; also inside its machine
state): name, RAM, vCPUs, the device to pass through, the guest and its DMA
workload, the metrics address."""

from __future__ import annotations

from luvmm.liveupdate.state import check_vm_name
from luvmm.vmm import guest

GUESTS = ("firmware", "synthetic")


class VmConfig:
    """A VM's configuration (vms/NAME/config.json).  A plain class, not a
    dataclass: ``dataclasses`` costs tens of milliseconds on the restore path."""

    FIELDS = ("name", "memory", "vcpus", "device", "guest", "slots", "pairs", "xfer", "metrics")

    def __init__(self, name: str, memory: int = 256 << 20, vcpus: int = 1, device: str = "auto",
                 guest: str = "firmware", slots: int = 32, pairs: int = 4, xfer: int = 16 << 10,
                 metrics: str | None = None):
        self.name, self.memory, self.vcpus, self.device, self.guest = name, memory, vcpus, device, guest
        self.slots, self.pairs, self.xfer = slots, pairs, xfer
        #: where the VMM serves Prometheus metrics, "[ADDRESS:]PORT" (None: not served)
        self.metrics = metrics

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> VmConfig:
        return cls(**{k: d[k] for k in cls.FIELDS if k in d})

    def __repr__(self) -> str:
        return f"VmConfig({self.to_dict()})"

    def check(self) -> None:
        check_vm_name(self.name)
        if not isinstance(self.memory, int) or self.memory < guest.MIN_MEMORY or self.memory % (2 << 20):
            raise ValueError(f"memory must be a multiple of 2 MiB and at least {guest.MIN_MEMORY >> 20} MiB")
        if not 1 <= self.vcpus <= 16:
            raise ValueError("vcpus must be 1..16")
        if self.guest not in GUESTS:
            raise ValueError("guest must be firmware or synthetic")
        if guest.DMA_BASE + guest.workload_bytes(self.slots, self.pairs, self.xfer) > min(
                self.memory, guest.LOW_RAM_LIMIT):
            raise ValueError("the DMA workload does not fit in guest RAM: lower slots, pairs or xfer")
        if not 1 <= self.slots <= 64 or not 1 <= self.pairs <= 16 or self.xfer % 8 or not 8 <= self.xfer <= 1 << 20:
            raise ValueError("slots 1..64, pairs 1..16, xfer a multiple of 8 up to 1 MiB")
