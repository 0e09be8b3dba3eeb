"""The messages of luvmm's control sockets, declared in one place: each
request's name, its fields (type, and whether it must be there) and what its
reply holds.  Servers check every request against this before anything else
(:func:`check`: EINVAL for an unknown request or a field of the wrong type),
so a handler reads fields it knows are there.

    HOST    host.sock, the emulated host's daemon (luvmm.liveupdate.emu.daemon)
    INIT    init.sock, luvmm's init under `luvmm boot` (luvmm.liveupdate.boot)
    AGENT   agent.sock, the LUO agent (luvmm.liveupdate.agent)
    CHANNEL a VMM's channel to the agent, where the agent asks (luvmm.vmm.control)
    VMM     vms/NAME/vmm.sock, a VMM's own socket (luvmm.vmm.control)

Lean: the agent's restore path imports it.
"""

from __future__ import annotations

NUMBER = (int, float)
OPTIONAL_INT = (int, type(None))


def _req(**fields):
    """Fields of a request: name -> type (required) or (type, None) (optional)."""
    return fields


HOST = {
    "hello": (_req(), "{pid, generation}"),
    "open": (_req(path=str, flags=(int, None)), "true, and the new file's fd"),
    "listdir": (_req(path=str), "[names]"),
    "kexec": (_req(), "{generation, seconds, kho_bytes, kho_error, marks}"),
    "status": (_req(), "{pid, kernel, units, machine, faults, last_kexec, disk_error, ...}"),
    "stop": (_req(), '"stopping"'),
    "units": (_req(), "[{name, pid, running, returncode, restarts, failed, starts, fdstore, sockets}]"),
    "unit-of": (_req(pid=int), "the unit's name, or null"),
    "unit-start": (_req(name=str), "{name, pid}"),
    "unit-stop": (_req(name=str), "{name, returncode}"),
    "faults": (_req(clear=(bool, None), set=(str, None)), "[the faults in force]"),
    "watch": (_req(bdf=str, iova=int), "true"),
    "observe": (_req(bdf=str, t0=NUMBER + (str,), t1=NUMBER + (str,), iova=(OPTIONAL_INT, None)),
                "{completions, max_completion_gap_s, heartbeat_changes?, heartbeat_max_gap_s?}"),
    "heartbeat": (_req(bdf=str, t0=NUMBER + (str,), t1=NUMBER + (str,), iova=int),
                  "[[time, value]]: the watched word where it changed, and where it stood before a change"),
    "timeline": (_req(bdf=str, t0=NUMBER + (str,), t1=NUMBER + (str,), bin_s=NUMBER + (str,),
                      iova=(OPTIONAL_INT, None)),
                 "{t0, bin_s, bytes, completions, heartbeat_changes?, heartbeat_pace_hz?}"),
}

INIT = {
    "hello": (_req(), "{pid, boot, state_dir, units}"),
    **{op: HOST[op] for op in ("units", "unit-of", "unit-start", "unit-stop")},
}

AGENT = {
    "hello": (_req(), "{pid, boot, generation, update}"),
    "create-session": (_req(name=str, fresh=(bool, None)), "{created}, and the session's fd"),
    "retrieve-session": (_req(name=str), "true, and the incoming session's fd"),
    "register": (_req(name=str), "true; then the agent asks on this connection (CHANNEL)"),
    "restored": (_req(name=str, report=(dict, None)), "true"),
    "resumed": (_req(name=str), "true"),
    "release": (_req(name=str), "{released: [what was let go]}"),
    "hold": (_req(name=str), "true: no update starts until this connection releases the VM or closes "
                             "(EBUSY while one is in progress)"),
    "update": (_req(timeout=(NUMBER, None)), "{update, vms}"),
    "result": (_req(timeout=(NUMBER, None)), "the update's record: {id, vms, phase, reports, error?}"),
    "status": (_req(), "{vmms, outgoing, incoming, update}"),
    "abandon": (_req(), "the update's record"),
    "check": (_req(device=(str, None)), "{memfd, vfio, iommufd, hwpt}: what PRESERVE_FD answered for each"),
}

CHANNEL = {
    "ready": (_req(update=str), "true: the VM's files are in its session, its guest runs on"),
    "prepare": (_req(update=str), "{phases}: paused and saved"),
    "cancel": (_req(update=str), "true: resumed"),
}

VMM = {
    "status": (_req(), "{name, pid, boot, guest_state, mailbox, bdf, ready, prepared, last_update, ...}"),
    "stop": (_req(), "true"),
}


def check(schema: dict, request: dict) -> None:
    """ValueError (EINVAL) unless ``request`` is one of ``schema``'s, with its fields."""
    op = request.get("op")
    entry = schema.get(op) if isinstance(op, str) else None
    if entry is None:
        raise ValueError(f"unknown request {str(op)[:40]!r}")
    for name, kind in entry[0].items():
        optional = isinstance(kind, tuple) and len(kind) == 2 and kind[1] is None
        types = kind[0] if optional else kind
        if name not in request:
            if optional:
                continue
            raise ValueError(f"{op}: no {name!r}")
        value = request[name]
        if value is None and optional:
            continue
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise ValueError(f"{op}: {name!r} is not {_names(types)}")
        if not isinstance(value, types):
            raise ValueError(f"{op}: {name!r} is not {_names(types)}")


def _names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(getattr(t, "__name__", str(t)) for t in types if t is not type(None))
