"""What a VM may be called: one rule for the CLI, the agent, the daemon, the
VMM and the real host's systemd units (luvmm.liveupdate.state re-exports it); and
what a listening address may be (a metrics port: the CLI, init, systemd's
socket units, the VMM).  Lean: the restore path imports it."""

from __future__ import annotations

#: What a VM name may hold: it names a LUO session (1..63 bytes: the uAPI's
#: name[LIVEUPDATE_SESSION_NAME_LENGTH] holds a NUL), a unit (``vm-NAME``; on
#: a real host the systemd instance ``luvmm-vm@NAME.service``, whose names
#: take ASCII letters, digits and ``:-_.\\``), a directory ``vms/NAME`` and a
#: Prometheus label value.  So: letters, digits, ``-``, ``_`` and ``.``, not
#: starting with ``.`` or ``-`` (no ``.``/``..``, nothing read as an option).
VM_NAME_MAX = 63
VM_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def check_vm_name(name) -> str:
    """``name`` if it is a valid VM name, else ValueError saying why (not
    ``re``: the restore path imports this module)."""
    if not isinstance(name, str) or not name:
        raise ValueError("a VM name cannot be empty")
    if len(name.encode()) > VM_NAME_MAX:
        raise ValueError(f"VM name {name[:20]!r}... is {len(name.encode())} bytes: at most {VM_NAME_MAX} "
                         "(it names the VM's LUO session)")
    bad = sorted(set(name) - VM_NAME_CHARS)
    if bad:
        raise ValueError(f"VM name {name!r} holds {''.join(bad)!r}: use letters, digits, '-', '_' and '.'")
    if name[0] in ".-":
        raise ValueError(f"VM name {name!r} starts with {name[0]!r}: start it with a letter or a digit")
    return name


def parse_listen(spec, what: str = "address") -> tuple[str, int]:
    """``PORT`` (loopback: what `--metrics-port` means by a bare port) or
    ``ADDRESS:PORT`` (``[ADDRESS]:PORT`` for IPv6) -> (address, port).
    ValueError naming ``what`` if it is neither."""
    text = str(spec)
    address, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"bad {what} {text!r}: want PORT or ADDRESS:PORT") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"bad {what} {text!r}: port {number}")
    return address.strip("[]") or "127.0.0.1", number
