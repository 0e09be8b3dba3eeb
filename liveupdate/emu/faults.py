"""Fault injection in the emulated host: off unless asked for.

Like the kernel's own fault injection (``fail_function``, debugfs knobs), a
fault is a rule on a point of the kernel's path, set when the daemon starts
(``LUVMM_FAULTS`` in its environment) or at run time (``luvmm host faults``,
the ``faults`` control request)::

    POINT[:HANDLER][@SESSION]=ACTION[,...]

POINT is where the fault strikes:

* ``preserve``, ``freeze``, ``retrieve``, ``finish``: a LUO file handler's
  callback (PRESERVE_FD, the freeze inside the kexec reboot, RETRIEVE_FD,
  FINISH), optionally only for one HANDLER (``memfd-v1``, ``vfio-pci-v1``,
  ``iommufd-v1``) and one SESSION (the VM's name);
* ``kexec``: the ``reboot(LINUX_REBOOT_CMD_KEXEC)`` call itself, before anything
  is frozen;
* ``kho``: the image the old kernel hands over.

ACTION is what happens there:

* ``fail`` -- the callback fails with EIO (a failing freeze unfreezes the files
  frozen before it and the reboot returns the error);
* ``stall:SECONDS`` -- the call takes that much longer (the hardware, and its
  DMA, go on meanwhile);
* ``kill:UNIT`` -- init SIGKILLs that unit (``agent``, ``vm-NAME``) there, as if
  it died at that very step; at ``kexec`` the reboot then does not happen;
* ``clear-bus-master`` (``kexec`` only) -- the new kernel clears Bus Master
  Enable on the preserved devices too, as a PCI core that forgets them would;
* ``corrupt``, ``truncate`` (``kho`` only) -- flip a byte of the image, or cut it
  in half: the new kernel must refuse it with a message;
* ``skew`` (``kho`` only) -- a well-formed image (its checksum holds) whose LUO
  tree is not what this kernel reads, as from another kernel version: the new
  kernel must refuse it whole and boot clean.

A rule strikes every time its point is reached, until it is cleared.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CALLBACKS = ("preserve", "freeze", "retrieve", "finish")
POINTS = CALLBACKS + ("kexec", "kho")
HANDLERS = ("memfd-v1", "vfio-pci-v1", "iommufd-v1")


class FaultSpecError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    point: str
    action: str  # fail | stall | kill | clear-bus-master | corrupt | truncate | skew
    handler: str | None = None
    session: str | None = None
    seconds: float = 0.0
    unit: str | None = None

    def matches(self, point: str, handler: str | None, session: str | None) -> bool:
        return (self.point == point and self.handler in (None, handler)
                and self.session in (None, session))

    def __str__(self) -> str:
        where = self.point + (f":{self.handler}" if self.handler else "") + (f"@{self.session}" if self.session else "")
        what = {"stall": f"stall:{self.seconds:g}", "kill": f"kill:{self.unit}"}.get(self.action, self.action)
        return f"{where}={what}"


def parse_rule(item: str) -> Rule:
    where, sep, what = item.strip().partition("=")
    if not sep or not where or not what:
        raise FaultSpecError(f"fault {item!r}: expected POINT[:HANDLER][@SESSION]=ACTION")
    where, _, session = where.partition("@")
    point, _, handler = where.partition(":")
    if point not in POINTS:
        raise FaultSpecError(f"fault {item!r}: unknown point {point!r} (one of {', '.join(POINTS)})")
    if handler and (point not in CALLBACKS or handler not in HANDLERS):
        raise FaultSpecError(f"fault {item!r}: a handler ({', '.join(HANDLERS)}) goes with a callback point")
    if session and point not in CALLBACKS:
        raise FaultSpecError(f"fault {item!r}: a session goes with a callback point")
    action, _, arg = what.partition(":")
    allowed = {"kho": ("corrupt", "truncate", "skew"), "kexec": ("stall", "kill", "clear-bus-master")}.get(
        point, ("fail", "stall", "kill"))
    if action not in allowed:
        raise FaultSpecError(f"fault {item!r}: at {point} the action is one of {', '.join(allowed)}")
    seconds, unit = 0.0, None
    if action == "stall":
        try:
            seconds = float(arg)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds <= 600:
            raise FaultSpecError(f"fault {item!r}: stall:SECONDS, 0 < SECONDS <= 600")
    elif action == "kill":
        if not arg:
            raise FaultSpecError(f"fault {item!r}: kill:UNIT (agent, vm-NAME)")
        unit = arg
    elif arg:
        raise FaultSpecError(f"fault {item!r}: {action} takes no argument")
    return Rule(point, action, handler or None, session or None, seconds, unit)


def parse(spec: str) -> list[Rule]:
    return [parse_rule(item) for item in spec.split(",") if item.strip()]


class Faults:
    """The rules in force, and what the kernel asks of them."""

    def __init__(self, rules: list[Rule] | None = None):
        self.rules: list[Rule] = list(rules or [])
        self.hits = 0  # faults that struck (shown by `luvmm host status`)

    @classmethod
    def from_env(cls) -> "Faults":
        return cls(parse(os.environ.get("LUVMM_FAULTS", "")))

    def set(self, spec: str) -> None:
        """Add rules (all or none: a bad spec changes nothing)."""
        self.rules += parse(spec)

    def clear(self) -> None:
        self.rules.clear()

    def describe(self) -> list[str]:
        return [str(r) for r in self.rules]

    def at(self, point: str, handler: str | None = None, session: str | None = None) -> list[Rule]:
        """The rules that strike here."""
        found = [r for r in self.rules if r.matches(point, handler, session)]
        self.hits += len(found)
        return found

    def kho_image(self, image: bytes) -> bytes:
        for rule in self.at("kho"):
            if rule.action == "corrupt":
                broken = bytearray(image)
                broken[len(broken) // 2] ^= 0xFF
                image = bytes(broken)
            elif rule.action == "truncate":
                image = image[: len(image) // 2]
            elif rule.action == "skew":
                from luvmm.liveupdate.emu.kernel import kho

                tree = kho.decode_image(image)
                for session in tree.get("luo", {}).get("sessions", []):
                    session["files"] = {"layout": "v2"}  # a list in this kernel's layout
                image = kho.encode_image(tree)
        return image
