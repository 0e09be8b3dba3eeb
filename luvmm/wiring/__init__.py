"""Wiring a host: the one place where an entry point of the product (a VMM
unit's main, the agent's) chooses between the real kernel and the emulated
host -- and the only module outside the emulator, with the CLI and its
tools, that imports it.  Everything else takes the Host and the Services it
is handed."""

from __future__ import annotations

from luvmm.host import Host
from luvmm.services import Services, Units


def connect(kind: str, socket_path: str | None = None, state_dir: str | None = None) -> tuple[Host, Services]:
    """``kind`` "real": the running kernel and systemd (``state_dir``: where
    the agent keeps its record of the last update, whose reboot the
    machine's last_kexec times); "emulated": the emulated host whose control
    socket is ``socket_path``."""
    if kind == "real":
        from luvmm.host import RealHost
        from luvmm.services import SystemdUnits
        from luvmm.wiring.real import RealMachine

        return RealHost(), Services(units=SystemdUnits(), machine=RealMachine(state_dir))
    from liveupdate.emu.client import connect as connect_emulated
    from liveupdate.emu.services import services_for

    host = connect_emulated(socket_path)
    return host, services_for(host)


def real_units(state) -> "Units":
    """A real host's init for the VMs of ``state``: systemd (`luvmm host install`)."""
    from luvmm.services import SystemdUnits

    return SystemdUnits()
