"""The emulated host's services (luvmm.services), over its control socket:
its init's units, the observer on its machine's bus, what its machine says
of its kernel and of the last kexec."""

from __future__ import annotations

from luvmm.services import InitUnits, MachineInfo, Observer, Services

#: The emulated host's init is luvmm's own (luvmm.liveupdate.init), reached over
#: host.sock: the product's client of any such init.
EmulatedUnits = InitUnits


class EmulatedObserver(Observer):
    def __init__(self, client):
        self.client = client

    def watch(self, bdf: str, iova: int) -> None:
        self.client.call({"op": "watch", "bdf": bdf, "iova": iova})

    def observe(self, bdf: str, t0: float, t1: float, iova: int | None = None) -> dict:
        return self.client.call({"op": "observe", "bdf": bdf, "t0": t0, "t1": t1, "iova": iova})[0]

    def timeline(self, bdf: str, t0: float, t1: float, bin_s: float, iova: int | None = None) -> dict:
        return self.client.call({"op": "timeline", "bdf": bdf, "t0": t0, "t1": t1, "bin_s": bin_s, "iova": iova})[0]

    def heartbeat(self, bdf: str, t0: float, t1: float, iova: int) -> list[tuple[float, int]]:
        points = self.client.call({"op": "heartbeat", "bdf": bdf, "t0": t0, "t1": t1, "iova": iova})[0]
        return [(t, value) for t, value in points]


class EmulatedMachine(MachineInfo):
    def __init__(self, client):
        self.client = client

    def _status(self) -> dict:
        return self.client.call({"op": "status"})[0]

    def kernel_profile(self) -> str | None:
        return self._status()["kernel_profile"]

    def last_kexec(self) -> dict:
        return self._status().get("last_kexec") or {}

    def features(self, device: str | None = None) -> dict:
        """The emulated kernel has KHO, kexec and an IOMMU (every function
        alone in its group, numbered as its VFIO cdev); its functions are
        bound to vfio-pci."""
        found = {"kho": True, "kexec_file_load": "EBADF", "iommus": ["emulated"]}
        if device:
            funcs = {f["bdf"]: f for f in self._status()["kernel"]["vfio"]}
            f = funcs.get(device)
            found["device_exists"] = f is not None
            found["driver"] = "vfio-pci" if f else None
            found["iommu_group"] = f["cdev"].rsplit("vfio", 1)[-1] if f else None
        return found

    def status(self) -> dict:
        """The whole machine's status (devices, sessions, units): what `luvmm host status` prints."""
        return self._status()


def services_for(client) -> Services:
    """The services of the emulated host that ``client`` (luvmm.liveupdate.emu.client) speaks to."""
    return Services(units=InitUnits(client), observer=EmulatedObserver(client), machine=EmulatedMachine(client))
