"""Wiring a host: the one place where an entry point of the product (a VMM
unit's main, the agent's) chooses between the real kernel and the emulated
host -- and the only module outside the emulator, with the CLI and its
tools, that imports it.  Everything else takes the Host and the Services it
is handed."""

from __future__ import annotations

import os

from luvmm.host import Host
from luvmm.services import Services, Units


def connect(kind: str, socket_path: str | None = None, state_dir: str | None = None) -> tuple[Host, Services]:
    """``kind`` "real": the running kernel, and its init -- `luvmm boot`'s
    when it started this unit (it says where it answers in
    ``$LUVMM_INIT_SOCKET``), else systemd (``state_dir``: where the agent
    keeps its record of the last update, whose reboot the machine's
    last_kexec times); "emulated": the emulated host whose control socket
    is ``socket_path``."""
    if kind == "real":
        from luvmm.host import RealHost
        from luvmm.wiring.real import RealMachine

        return RealHost(), Services(units=_real_init(os.environ.get("LUVMM_INIT_SOCKET")),
                                    machine=RealMachine(state_dir))
    from luvmm.liveupdate.emu.client import connect as connect_emulated
    from luvmm.liveupdate.emu.services import services_for

    host = connect_emulated(socket_path)
    return host, services_for(host)


def _real_init(init_socket: str | None) -> Units:
    if init_socket:
        from luvmm.services import InitClient, InitUnits

        return InitUnits(InitClient(init_socket))
    from luvmm.services import SystemdUnits

    return SystemdUnits()


def real_units(state) -> Units:
    """A real host's init, for a command acting on the VMs of ``state``
    (a luvmm.liveupdate.state.StateDir): `luvmm boot`'s when its init answers on
    ``init.sock`` in the state dir, else systemd's.  Asked, not guessed
    from the file: a socket left by an init that died (or by the kernel
    before a kexec) is no init."""
    from luvmm.services import InitClient, InitUnits, SystemdUnits

    client = InitClient(state.init_socket, timeout=10.0)
    try:
        client.call({"op": "hello"})
    except OSError:
        client.close()
        from luvmm.wiring import systemd

        return SystemdUnits(state=state, socket_units=systemd)
    return InitUnits(client)
