"""`luvmm vm`: VMs as units of their host -- start, stop, status, list, log."""

from __future__ import annotations

import argparse
import os

from luvmm import exitcodes
from luvmm.cli.common import (
    CliError,
    Connection,
    count,
    DEFAULT_DSA_BANDWIDTH,
    Parser,
    guest_arg,
    host_arg,
    is_real,
    json_arg,
    memory_args,
    metrics_port_arg,
    metrics_url,
    pick_guest,
    positive_seconds,
    print_json,
    running_host,
    say,
    state_dir_arg,
    state_of,
    vcpu_count,
    vm_name_arg,
)


def _cmd_vm_start(args: argparse.Namespace) -> int:
    from luvmm.vmm import manage
    from luvmm.vmm.config import VmConfig

    real = is_real(args)
    if real:  # any PCI function, named: no "first free DSA" on a real host
        from luvmm.devices.vfio import is_bdf

        if args.device == "auto":
            raise CliError("--host real: name the device to pass through (--device BDF, a PCI function bound to "
                           "vfio-pci, as lspci -D prints it)", exitcodes.USAGE)
        if not is_bdf(args.device):
            raise CliError(f"--device {args.device}: not a PCI address (DDDD:BB:DD.F, as lspci -D prints it)",
                           exitcodes.USAGE)
    guest = pick_guest(args.guest)
    config = VmConfig(args.name, memory=args.memory, vcpus=args.vcpus, device=args.device, guest=guest,
                      metrics=args.metrics_port)
    try:
        config.check()
    except ValueError as e:
        raise CliError(str(e), exitcodes.USAGE) from None
    state = state_of(args)
    if args.name in state.vm_names():
        raise CliError(f"VM {args.name!r} exists in {state.path}")
    if not args.overcommit:
        manage.check_fits(state, config)  # before a host is started for it
    if real:
        from luvmm.wiring import real_units

        st = manage.start(state, config, real_units(state), overcommit=args.overcommit, host="real",
                          wait=args.timeout)
    else:
        st = _start_emulated(args, state, config)
    device = f"device {st['bdf']}" if real else f"DSA {st['bdf']}"
    print(f"VM {args.name} running (pid {st['pid']}, {args.memory >> 20} MiB, {args.vcpus} vCPU, {device}, "
          f"{guest} guest)")
    if st.get("metrics_port") is not None:
        print(f"Prometheus metrics on http://{metrics_url(args.metrics_port)}/metrics")
    return exitcodes.OK


def _start_emulated(args: argparse.Namespace, state, config) -> dict:
    """Start the VM on the emulated host, starting one (and saying so) if none runs."""
    from luvmm.liveupdate.emu import hostctl
    from luvmm.liveupdate.emu.services import EmulatedUnits
    from luvmm.vmm import manage

    _, started = hostctl.ensure(state.path, say=say, dsa_bandwidth=DEFAULT_DSA_BANDWIDTH)
    try:
        with Connection(state) as host:
            return manage.start(state, config, EmulatedUnits(host), overcommit=args.overcommit, wait=args.timeout)
    except BaseException as e:
        if started and not state.vm_names():  # a host started for a VM that did not start goes too
            # ... but not the log its error points to.
            hostctl.stop(state, keep_logs=(e.log,) if getattr(e, "log", None) else ())
        raise


def _cmd_vm_stop(args: argparse.Namespace) -> int:
    from luvmm.vmm import manage

    state = state_of(args)
    if not state.exists() or args.name not in state.vm_names():
        raise CliError(f"no VM {args.name!r} in {state.path}")
    if is_real(args):
        from luvmm.wiring import real_units

        state.check_safe()
        manage.stop(state, args.name, real_units(state))
        print(f"VM {args.name} stopped")
        return exitcodes.OK
    from luvmm.liveupdate.emu import hostctl
    from luvmm.liveupdate.emu.services import EmulatedUnits

    if _remove_without_host(state, args.name):
        print(f"VM {args.name} removed (no host was running it)")
        return exitcodes.OK
    from luvmm.liveupdate.emu.client import HostGone

    with Connection(state) as host:
        try:
            manage.stop(state, args.name, EmulatedUnits(host))
        except HostGone:
            if args.name in state.vm_names():
                raise  # it went before anything was touched: the VM is as it was
            # It went after the VM's unit was removed: a host started since
            # may run the VM (see manage.let_go); with none, nothing does.
            if _remove_without_host(state, args.name):
                manage.let_go(state, args.name, None)  # its directory: nothing runs it
            else:
                with Connection(state) as now:
                    manage.let_go(state, args.name, EmulatedUnits(now))
    print(f"VM {args.name} stopped")
    return exitcodes.OK


def _remove_without_host(state, name: str) -> bool:
    """Where no host runs: remove the VM's definition (and what the stopped
    host kept for it) under the host lock, so that a host starting at the
    same moment cannot boot the VM from it meanwhile (the interleavings
    stress test found one running a VM that was no longer defined).  False:
    a host runs (or came up while we waited for its lock): stop it there."""
    import time

    from luvmm.liveupdate.emu import hostctl
    from luvmm.liveupdate.state import lock_file
    from luvmm.vmm import manage

    deadline = time.monotonic() + hostctl.LOCK_WAIT_S
    while not hostctl.running(state):
        lock = lock_file(state.host_lock)
        if lock is not None:
            try:
                if hostctl.running(state):  # one that holds no lock (an older luvmm's)
                    return False
                manage.stop(state, name, None)
                state.clean()  # what the stopped host kept for it
                return True
            finally:
                os.close(lock)
        if time.monotonic() >= deadline:
            raise CliError(f"an emulated host is starting or stopping in {state.path}: try again")
        time.sleep(0.01)  # another command holds the lock: a host starting, or one stopping
    return False


def _vm_states(state, names: list[str], real: bool = False) -> dict[str, dict]:
    """Each VM's status, from its VMM; where it does not answer, why (and
    what its unit says: init gave up on a VMM that kept failing the same way)."""
    from luvmm.vmm import manage

    out, units = {}, None
    for name in names:
        try:
            out[name] = manage.status(state, name)
        except (OSError, ValueError, manage.VmError) as e:
            out[name] = {"error": getattr(e, "strerror", None) or str(e)}
            if units is None:
                units = _units(state, real)
            unit = units.get(f"vm-{name}") or {}
            if unit.get("failed"):
                out[name]["failed"] = unit["failed"]
                out[name]["log"] = str(state.logs / f"vm-{name}.log")
    return out


def _units(state, real: bool) -> dict[str, dict]:
    """The host's units, by name ({} if its init does not answer)."""
    try:
        if real:
            from luvmm.wiring import real_units

            listed = real_units(state).list()
        else:
            with Connection(state) as host:
                listed = host.call({"op": "units"})[0]
    except (OSError, CliError):
        return {}
    return {u["name"]: u for u in listed}


def _vm_ok(st: dict) -> bool:
    return "error" not in st and not st["crash"]


def _cmd_vm_status(args: argparse.Namespace) -> int:
    state = running_host(args)
    names = state.vm_names()
    if args.name:
        if args.name not in names:
            raise CliError(f"no VM {args.name!r} in {state.path}")
        names = [args.name]
    out = _vm_states(state, names, is_real(args))
    if args.json:
        print_json(out)
    else:
        print(_format_vm_status(out, "device" if is_real(args) else "DSA"))
    return exitcodes.OK if all(_vm_ok(st) for st in out.values()) else exitcodes.FAILED


def _format_vm_status(out: dict[str, dict], device: str = "DSA") -> str:
    lines = []
    for name, st in out.items():
        if st.get("failed"):
            lines.append(f"{name}: FAILED: its VMM died {st['failed']} (its log: {st['log']}); "
                         f"`luvmm vm stop {name}` removes it")
            continue
        if "error" in st:
            lines.append(f"{name}: not running (its VMM does not answer: {st['error']})")
            continue
        mb = st["mailbox"]
        paused = " (paused for an update)" if st.get("prepared") else ""
        control = f", control plane pid {st['control_pid']}" if st.get("control_pid") else ""
        lines.append(f"{name}: pid {st['pid']} ({st['boot']} boot{control}), guest {st['guest_state']}{paused}, "
                     f"{device} {st['bdf']}, heartbeat {mb['heartbeat']}, batches {mb['completed']}/{mb['submitted']} "
                     f"({mb['descs_ok']} descriptors ok, {mb['errors']} errors, {mb['verify_failures']} corrupted), "
                     f"interrupts {st['interrupts']}" + (f", CRASHED: {st['crash']}" if st["crash"] else ""))
        lines += [f"  {line}" for line in _format_exits(st.get("exits")) + _format_path(st.get("guest_path"))]
    return "\n".join(lines)


def _short(name: str) -> str:
    return name.removeprefix("KVM_EXIT_")


def _format_exits(exits: dict | None) -> list[str]:
    """Where the VMM still is in the guest's path: the vCPU exits, per second
    (over the last second) and since the vCPUs started."""
    if not exits:
        return []
    rate = exits.get("per_second") or {}
    kvm, kvm_rate = exits["kvm"], rate.get("kvm", {})
    vmm, vmm_rate = exits["vmm"], rate.get("vmm", {})

    def pair(total, per_s) -> str:
        return f"{total}" if per_s is None else f"{per_s:g}/s ({total})"

    out = []
    if kvm:
        out.append("KVM exits: " + ", ".join(f"{name} {pair(kvm[name], kvm_rate.get(name))}"
                                              for name in ("exits", "mmio_exits", "io_exits", "signal_exits",
                                                           "halt_exits", "insn_emulation") if name in kvm))
    out.append("to the VMM: " + (", ".join(f"{_short(n)} {pair(v, vmm_rate.get(n))}" for n, v in sorted(vmm.items()))
                                 or "none")
               + f"; to its Python {pair(exits['to_vmm'], rate.get('to_vmm'))}")
    return out


def _format_path(path: list | None) -> list[str]:
    """Each BAR: how much of it is mapped into the guest, what traps and who serves it."""
    out = []
    for bar in path or ():
        names = {"vmm": "the VMM (MSI-X table)", "region": "run loop", "portal": "run loop, portal"}
        traps = ", ".join(f"{off:#x}-{off + size:#x} {names.get(how, how)}" for off, size, how in bar["trapped"])
        out.append(f"BAR{bar['bar']} ({bar['name']}, {bar['size'] >> 10} KiB at {bar['gpa']:#x}): "
                   f"{bar['mapped_bytes'] >> 10} KiB mapped into the guest"
                   + (f", trapped: {traps}" if traps else "")
                   + ("" if bar["mmap"] else " (VFIO offers no mmap)"))
    return out


def _cmd_vm_list(args: argparse.Namespace) -> int:
    state = state_of(args)
    names = state.vm_names() if state.exists() else []
    if is_real(args):
        if state.exists():
            state.check_safe()
        up = True  # a real host runs as long as this command does
    else:
        from luvmm.liveupdate.emu import hostctl

        up = hostctl.running(state)
    states = _vm_states(state, names, is_real(args)) if up else {}
    rows = [_list_row(state, n, states.get(n), up) for n in names]
    if args.json:
        print_json(rows)
    elif rows:
        print(_format_table(LIST_COLUMNS, [[_list_cell(key, row[key]) for key, _ in LIST_COLUMNS] for row in rows]))
    return exitcodes.OK


#: `vm list`'s columns: (key in its --json rows, heading).
LIST_COLUMNS = (("name", "NAME"), ("state", "STATE"), ("pid", "PID"), ("memory_bytes", "MEMORY"),
                ("device", "DEVICE"), ("uptime_s", "UPTIME"), ("last_blackout_s", "LAST BLACKOUT"))


def _list_row(state, name: str, st: dict | None, up: bool) -> dict:
    """One VM of `vm list`: from its VMM where it answers, else from its
    definition.  Uptime is since `vm start` (live updates do not reset it:
    the guest runs on); the last blackout is its last update's, kept in its
    metrics file across VMMs."""
    import json
    import os
    import time

    running = up and st is not None and _vm_ok(st)
    row = {"name": name, "state": ("running" if running else "failed" if st and st.get("failed") else "not running")
           if up else "host stopped",
           "pid": st["pid"] if running else None, "memory_bytes": None, "device": st["bdf"] if running else None,
           "uptime_s": None, "last_blackout_s": None}
    config_path = os.path.join(state.vm_dir(name), "config.json")
    try:
        config = json.loads(state.read_file(os.path.relpath(config_path, state.path)))
        row["memory_bytes"] = config.get("memory")
        if running:
            row["uptime_s"] = round(time.time() - os.stat(config_path).st_mtime, 1)
    except (OSError, ValueError):
        pass  # a definition being written or removed: its columns stay empty
    try:
        stats = json.loads(state.read_file(os.path.relpath(os.path.join(state.vm_dir(name), "metrics.json"),
                                                           state.path)))
        row["last_blackout_s"] = stats.get("last_blackout_s")
    except (OSError, ValueError):
        pass  # no update yet
    return row


def _list_cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "memory_bytes":
        return f"{value >> 20} MiB"
    if key == "uptime_s":
        seconds = int(value)
        return (f"{seconds // 86400}d {seconds % 86400 // 3600}h" if seconds >= 86400 else
                f"{seconds // 3600}h {seconds % 3600 // 60}m" if seconds >= 3600 else
                f"{seconds // 60}m {seconds % 60}s" if seconds >= 60 else f"{seconds}s")
    if key == "last_blackout_s":
        return f"{value * 1000:.1f} ms"
    return str(value)


def _format_table(columns, cells: list[list[str]]) -> str:
    widths = [max(len(heading), *(len(row[i]) for row in cells)) for i, (_, heading) in enumerate(columns)]
    lines = [[heading for _, heading in columns], *cells]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def _cmd_vm_log(args: argparse.Namespace) -> int:
    """The VM's log: what its VMMs said, start after start (each start's
    line, its boot: cold, kexec, restart), and what init said of them.  The
    guest has no console: what it does is in its mailbox (`vm status`)."""
    import os

    state = state_of(args)
    if not state.exists() or args.name not in state.vm_names():
        raise CliError(f"no VM {args.name!r} in {state.path}")
    path = state.logs / f"vm-{args.name}.log"
    if is_real(args) and not path.exists():
        raise CliError(f"on a systemd host the VM's log is the journal: journalctl -u luvmm-vm@{args.name}.service")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return exitcodes.OK  # nothing said yet
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - (1 << 20)))  # the last MiB at most: the lines asked for are in it
        lines = f.read().decode(errors="replace").splitlines()
    print("\n".join(lines[-args.lines:] if args.lines else lines))
    return exitcodes.OK


def add_parser(sub) -> None:
    vm = sub.add_parser("vm", help="VMs with a passed-through PCI device (a DSA on the emulated host): start, stop, "
                                   "status, list, log",
                        description="VMs are units of their host: init starts them again, in restore mode, "
                                    "after every kexec, and on the same RAM and device when their VMM dies. "
                                    "With --host real, this machine's VMs: their VMMs are systemd units "
                                    "(luvmm-vm@NAME.service), their state in /var/lib/luvmm.")
    vm_sub = vm.add_subparsers(dest="vm_command", metavar="ACTION", parser_class=Parser)
    vm_sub.required = True
    name_help = "the VM's name: 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
    vm_start = vm_sub.add_parser("start", help="start a VM (its guest drives a passed-through device)",
                                 description="Start a VM on the host (an emulated host is started there if none "
                                             "runs; on a real host, its unit luvmm-vm@NAME.service is enabled and "
                                             "started). Returns once its guest runs.")
    vm_start.add_argument("name", type=vm_name_arg, help=name_help)
    host_arg(vm_start)
    state_dir_arg(vm_start)
    memory_args(vm_start)
    vm_start.add_argument("--vcpus", type=vcpu_count, default=1, help="vCPUs, 1-16 (default 1)")
    vm_start.add_argument("--timeout", type=positive_seconds, default=60.0, metavar="SECONDS",
                          help="how long to wait for its guest to run before giving up on the VM (default 60)")
    vm_start.add_argument("--device", default="auto", metavar="BDF|auto",
                          help="the PCI function to pass through: on the emulated host a DSA (default auto: the "
                               "first free one); on a real host required, a function bound to vfio-pci")
    guest_arg(vm_start)
    metrics_port_arg(vm_start, "the VM's (blackout, phases, DMA continuity, guest counters)")
    vm_start.set_defaults(func=_cmd_vm_start)
    vm_stop = vm_sub.add_parser("stop", help="stop a VM and remove it",
                                description="Stop a VM and remove it: its VMM, its unit, its LUO session and what "
                                            "the agent keeps for it, its device (free for another VM).")
    vm_stop.add_argument("name", type=vm_name_arg, help=name_help)
    host_arg(vm_stop)
    state_dir_arg(vm_stop)
    vm_stop.set_defaults(func=_cmd_vm_stop)
    vm_status = vm_sub.add_parser("status", help="guest counters, device, interrupts, last update",
                                  description="Each VM's guest counters, device, interrupts and last update. Exit "
                                              "status 1 if a VM named does not exist, or one is not running.")
    vm_status.add_argument("name", nargs="?", type=vm_name_arg, help="one VM (default: every VM of the host)")
    host_arg(vm_status)
    state_dir_arg(vm_status)
    json_arg(vm_status, "{NAME: status}")
    vm_status.set_defaults(func=_cmd_vm_status)
    vm_log = vm_sub.add_parser("log", help="what the VM's VMMs said, start after start",
                               description="The VM's log: what each of its VMMs said (a line per start: cold, "
                                           "after a kexec, after a restart) and what init said of them. The "
                                           "guest has no console; its counters are in `luvmm vm status`.")
    vm_log.add_argument("name", type=vm_name_arg, help="the VM")
    vm_log.add_argument("--lines", "-n", type=count, default=40, metavar="N",
                        help="the last N lines (default 40; 0: all that is kept)")
    host_arg(vm_log)
    state_dir_arg(vm_log)
    vm_log.set_defaults(func=_cmd_vm_log)
    vm_list = vm_sub.add_parser("list", help="the VMs defined on the host: state, pid, memory, device, uptime, "
                                             "last blackout",
                                description="The VMs defined on the host, one line each: whether it runs, its "
                                            "VMM's pid, its memory, its device, its uptime (since `vm start`: "
                                            "live updates do not reset it) and its last update's blackout.")
    host_arg(vm_list)
    state_dir_arg(vm_list)
    json_arg(vm_list, '[{"name", "state", "pid", "memory_bytes", "device", "uptime_s", "last_blackout_s"}]')
    vm_list.set_defaults(func=_cmd_vm_list)
