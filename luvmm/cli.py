"""The `luvmm` command line.

Each subcommand imports what it needs when it runs, so `luvmm --help` and the
restore path stay fast.

Conventions, the same for every command (README.md):
* a mistake on the command line is one line on stderr and exit status 2;
  anything else that fails is one line ``luvmm CMD: why`` and a non-zero
  status from :mod:`luvmm.exitcodes` -- never a traceback;
* ``--json`` prints the command's result as one JSON document on stdout
  instead of the text (messages stay on stderr);
* sizes are ``N[K|M|G|T]`` (powers of two) everywhere;
* only `luvmm vm start` starts an emulated host where none runs (and says
  so); a command that reads or acts on a host never starts one;
* long work prints a progress line per step on stderr when it is a
  terminal, nothing extra otherwise;
* Ctrl-C stops cleanly: what was done so far is printed, the host is left
  as it was, exit status 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from luvmm import __version__, exitcodes

DEFAULT_DSA_BANDWIDTH = 64 << 20
#: Guest RAM when --memory is not given, for every command that starts VMs.
DEFAULT_MEMORY = 256 << 20
PROFILES = ("continuous-dma", "reset-on-freeze")


class CliError(Exception):
    """A command that cannot do what was asked: one line, and this exit status."""

    def __init__(self, message: str, status: int = exitcodes.FAILED):
        super().__init__(message)
        self.status = status


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and status 2), not the usage block."""

    def error(self, message: str):
        self.exit(exitcodes.USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


# --- argument types -------------------------------------------------------------------------


def _size(text: str) -> int:
    """A byte count: N, or N with a K/M/G/T suffix (powers of two; KiB, M, 1.5G...)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 64K, 256M, 1G)") from None
    if not 0 <= value < 1 << 62 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (a whole, non-negative number of bytes)")
    return int(value)


def _memory(text: str) -> int:
    """Guest RAM: a size the VM can have (checked here: one line, not a failure inside the VMM)."""
    from vmm.guest import MIN_MEMORY

    size = _size(text)
    if size < MIN_MEMORY or size % (2 << 20):
        raise argparse.ArgumentTypeError(f"guest RAM {text!r}: a multiple of 2 MiB, at least {MIN_MEMORY >> 20}M")
    return size


def _sizes(text: str) -> list[int]:
    """Comma-separated guest RAM sizes (at least one)."""
    sizes = [_memory(part) for part in text.split(",") if part.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError(f"no size in {text!r}")
    return sizes


def _counts(text: str) -> list[int]:
    """Comma-separated counts ("" for none)."""
    return [_positive(part) for part in text.split(",") if part.strip()]


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _devices(text: str) -> int:
    from liveupdate.emu.machine import MAX_DEVICES

    n = _positive(text)
    if n > MAX_DEVICES:
        raise argparse.ArgumentTypeError(f"at most {MAX_DEVICES} devices, not {n}")
    return n


def _vcpus(text: str) -> int:
    n = _positive(text)
    if n > 16:
        raise argparse.ArgumentTypeError(f"at most 16 vCPUs, not {n}")
    return n


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"seconds must be positive, not {text!r}")
    return value


def _vm_name(text: str) -> str:
    from liveupdate.state import check_vm_name

    try:
        return check_vm_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _listen(text: str) -> str:
    from metrics.http import parse_listen

    try:
        parse_listen(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _metrics_url(listen: str) -> str:
    from metrics.http import parse_listen

    address, port = parse_listen(listen)
    return f"{address}:{port}"


# --- shared options and output ----------------------------------------------------------------


def _state_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", metavar="DIR",
                   help="the emulated host's state dir (default: $LUVMM_STATE_DIR, else $XDG_RUNTIME_DIR/luvmm, "
                        "else /tmp/luvmm-UID)")


def _json_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as one JSON document on stdout instead of text")


def _memory_args(p: argparse.ArgumentParser, what: str = "guest RAM") -> None:
    p.add_argument("--memory", type=_memory, default=DEFAULT_MEMORY, metavar="SIZE",
                   help=f"{what}, e.g. 256M or 4G (default {DEFAULT_MEMORY >> 20}M)")
    p.add_argument("--overcommit", action="store_true",
                   help="allow VMs whose RAM adds up to more than the machine has")


def _guest_arg(p: argparse.ArgumentParser, auto: bool = True) -> None:
    choices = ("auto", "firmware", "synthetic") if auto else ("firmware", "synthetic")
    p.add_argument("--guest", choices=choices, default=choices[0],
                   help="firmware: the guest firmware under KVM; synthetic: the same DMA workload driven from the "
                        "host side (no KVM needed)" + ("; auto (default): firmware where /dev/kvm is usable"
                                                        if auto else " (default firmware)"))


def _profile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel-profile", choices=PROFILES, default=PROFILES[0],
                   help="what the emulated kernel does to a preserved device: continuous-dma (default) keeps it "
                        "DMAing through the kexec; reset-on-freeze (the upstream series) resets it at freeze")


def _bandwidth_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dsa-bandwidth", type=_size, default=DEFAULT_DSA_BANDWIDTH, metavar="BYTES",
                   help="bytes per second each emulated DSA moves, e.g. 1G, or 0 for as fast as memcpy (default 64M: "
                        "slow enough that work queued before a live update outlasts its blackout)")


def _metrics_port_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--metrics-port", metavar="[ADDRESS:]PORT", type=_listen,
                   help=f"serve {what} Prometheus metrics over HTTP at /metrics (on loopback unless ADDRESS "
                        "is given); README.md lists them")


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _progress():
    """A progress printer for long work: lines on stderr when it is a terminal, else None."""
    if not sys.stderr.isatty():
        return None
    return lambda line: print(f"  {line}", file=sys.stderr, flush=True)


def _state(args: argparse.Namespace):
    from liveupdate.state import StateDir, default_state_dir

    return StateDir(args.state_dir or default_state_dir())


def _running_host(args: argparse.Namespace):
    """The state dir of the running host, or CliError: never starts one."""
    from liveupdate.emu.hostctl import HostError, find

    try:
        return find(args.state_dir)
    except HostError as e:
        raise CliError(str(e)) from None


class _Connection:
    """``with _connect(state) as host``: a connection to the daemon, always closed."""

    def __init__(self, state):
        from liveupdate.emu.client import connect

        self.host = connect(state.socket)

    def __enter__(self):
        return self.host

    def __exit__(self, *exc):
        self.host.close_connection()


def _guest(choice: str) -> str:
    """--guest auto: the firmware under KVM where /dev/kvm is usable, else the synthetic guest."""
    if choice != "auto":
        return choice
    from vmm.kvm import kvm_available

    ok, why = kvm_available()
    if not ok:
        _say(f"no usable KVM ({why}): running the synthetic guest")
    return "firmware" if ok else "synthetic"


# --- uapi and bench dsa -----------------------------------------------------------------------


def _cmd_uapi(args: argparse.Namespace) -> int:
    from luvmm.uapi.table import format_table, uapi_values

    values = uapi_values()
    if args.json:
        _print_json(values)
    else:
        print(format_table(values))
    return exitcodes.OK


def _cmd_bench_dsa(args: argparse.Namespace) -> int:
    from devices.emu.dsa_bench import format_table, run

    result = run(total_bytes=args.bytes, batches=args.batches)
    _print_json(result) if args.json else print(format_table(result))
    return exitcodes.OK


# --- luvmm host ---------------------------------------------------------------------------------


def _cmd_host_start(args: argparse.Namespace) -> int:
    from liveupdate.emu import hostctl

    state = _state(args)
    if hostctl.running(state):
        raise CliError(f"an emulated host is already running in {state.path}")
    gone = hostctl.dead(state)
    if gone is not None:
        stopped = hostctl.bury(state)
        _say(f"the emulated host that ran in {state.path} had died{f' (pid {gone})' if gone > 0 else ''}: "
             f"stopped what was left of it ({len(stopped)} process(es)); starting a new one")
    earlier = state.vm_names() if state.exists() else []
    pid = hostctl.start(state, devices=args.devices, profile=args.kernel_profile,
                        dsa_bandwidth=args.dsa_bandwidth or None, agent=not args.no_agent,
                        metrics_port=args.metrics_port)
    print(f"emulated host running in {state.path} (pid {pid}, {args.devices} DSA, kernel profile "
          f"{args.kernel_profile}); control socket {state.socket}")
    if earlier:
        print(f"booting {len(earlier)} VM(s) defined there by an earlier run, cold (their RAM did not outlive "
              f"that host): {', '.join(earlier)}")
    if args.metrics_port is not None:
        print(f"Prometheus metrics on http://{_metrics_url(args.metrics_port)}/metrics")
    return exitcodes.OK


def _cmd_host_stop(args: argparse.Namespace) -> int:
    from liveupdate.emu import hostctl

    state = _state(args)
    kept = hostctl.stop(state)
    if kept is None:
        _say(f"no emulated host is running in {state.path}")
        return exitcodes.OK  # already stopped: what was asked holds (as `systemctl stop`)
    print(f"stopped the emulated host in {state.path}")
    if kept:
        print(f"kept the definitions of VM(s) {', '.join(kept)} there: `luvmm host start` boots them again, "
              "`luvmm vm stop NAME` removes one")
    return exitcodes.OK


def _cmd_host_status(args: argparse.Namespace) -> int:
    from liveupdate.emu.hostctl import format_status

    with _Connection(_running_host(args)) as host:
        status = host.call({"op": "status"})[0]
    _print_json(status) if args.json else print(format_status(status))
    return exitcodes.OK


def _cmd_host_faults(args: argparse.Namespace) -> int:
    with _Connection(_running_host(args)) as host:
        request = {"op": "faults", "clear": args.clear}
        if args.spec:
            request["set"] = ",".join(args.spec)
        try:
            rules = host.call(request)[0]
        except OSError as e:
            raise CliError(e.strerror or str(e), exitcodes.USAGE) from None
    if args.json:
        _print_json(rules)
    else:
        print("\n".join(rules) if rules else "no faults injected")
    return exitcodes.OK


def _cmd_host_kexec(args: argparse.Namespace) -> int:
    state = _running_host(args)
    with _Connection(state) as host:
        running = [u["name"][3:] for u in host.call({"op": "units"})[0] if u["name"].startswith("vm-") and u["running"]]
        if running and not args.force:
            raise CliError(f"VM(s) {', '.join(running)} run on this host: a bare kexec saves no machine state, so "
                           "they would be lost. Live-update them with `luvmm update`, or kexec anyway with --force")
        if running:
            _say(f"kexec --force: VM(s) {', '.join(running)} were not prepared; their VMMs find no saved machine "
                 "state after the reboot and the VMs are lost")
        try:
            info = host.kexec()
        except OSError as e:
            raise CliError(f"kexec failed: {e.strerror} (errno {e.errno}); the old kernel is still running") from None
    if args.json:
        _print_json(info)
    else:
        print(f"kexec done: generation {info['generation']}, {info['seconds'] * 1000:.1f} ms, KHO image "
              f"{info['kho_bytes']} bytes")
    if info.get("kho_error"):
        raise CliError(f"the new kernel refused the KHO image: {info['kho_error']}")
    return exitcodes.OK


# --- luvmm vm -------------------------------------------------------------------------------------


def _cmd_vm_start(args: argparse.Namespace) -> int:
    from liveupdate.emu import hostctl
    from liveupdate.emu.services import EmulatedUnits
    from liveupdate.emu.hostctl import ensure
    from vmm import manage
    from vmm.vm import VmConfig

    guest = _guest(args.guest)
    config = VmConfig(args.name, memory=args.memory, vcpus=args.vcpus, device=args.device, guest=guest,
                      metrics=args.metrics_port)
    try:
        config.check()
    except ValueError as e:
        raise CliError(str(e), exitcodes.USAGE) from None
    state = _state(args)
    if args.name in state.vm_names():
        raise CliError(f"VM {args.name!r} exists in {state.path}")
    if not args.overcommit:
        manage.check_fits(state, config)  # before a host is started for it
    started = not hostctl.running(state)
    ensure(args.state_dir, say=_say, dsa_bandwidth=DEFAULT_DSA_BANDWIDTH)
    try:
        with _Connection(state) as host:
            st = manage.start(state, config, EmulatedUnits(host), overcommit=args.overcommit)
    except BaseException:
        if started and not state.vm_names():  # a host started for a VM that did not start goes too
            hostctl.stop(state)
        raise
    print(f"VM {args.name} running (pid {st['pid']}, {args.memory >> 20} MiB, {args.vcpus} vCPU, DSA {st['bdf']}, "
          f"{guest} guest)")
    if st.get("metrics_port") is not None:
        print(f"Prometheus metrics on http://{_metrics_url(args.metrics_port)}/metrics")
    return exitcodes.OK


def _cmd_vm_stop(args: argparse.Namespace) -> int:
    from liveupdate.emu import hostctl
    from liveupdate.emu.services import EmulatedUnits
    from vmm import manage

    state = _state(args)
    if not state.exists() or args.name not in state.vm_names():
        raise CliError(f"no VM {args.name!r} in {state.path}")
    if not hostctl.running(state):
        manage.stop(state, args.name, None)
        state.clean()  # what the stopped host kept for it
        print(f"VM {args.name} removed (no host was running it)")
        return exitcodes.OK
    with _Connection(state) as host:
        manage.stop(state, args.name, EmulatedUnits(host))
    print(f"VM {args.name} stopped")
    return exitcodes.OK


def _vm_states(state, names: list[str]) -> dict[str, dict]:
    from vmm import manage

    out = {}
    for name in names:
        try:
            out[name] = manage.status(state, name)
        except (OSError, ValueError, manage.VmError) as e:
            out[name] = {"error": getattr(e, "strerror", None) or str(e)}
    return out


def _vm_ok(st: dict) -> bool:
    return "error" not in st and not st["crash"]


def _cmd_vm_status(args: argparse.Namespace) -> int:
    state = _running_host(args)
    names = state.vm_names()
    if args.name:
        if args.name not in names:
            raise CliError(f"no VM {args.name!r} in {state.path}")
        names = [args.name]
    out = _vm_states(state, names)
    if args.json:
        _print_json(out)
    else:
        print(_format_vm_status(out))
    return exitcodes.OK if all(_vm_ok(st) for st in out.values()) else exitcodes.FAILED


def _format_vm_status(out: dict[str, dict]) -> str:
    lines = []
    for name, st in out.items():
        if "error" in st:
            lines.append(f"{name}: not running (its VMM does not answer: {st['error']})")
            continue
        mb = st["mailbox"]
        paused = " (paused for an update)" if st.get("prepared") else ""
        lines.append(f"{name}: pid {st['pid']} ({st['boot']} boot), guest {st['guest_state']}{paused}, "
                     f"DSA {st['bdf']}, heartbeat {mb['heartbeat']}, batches {mb['completed']}/{mb['submitted']} "
                     f"({mb['descs_ok']} descriptors ok, {mb['errors']} errors, {mb['verify_failures']} corrupted), "
                     f"interrupts {st['interrupts']}" + (f", CRASHED: {st['crash']}" if st["crash"] else ""))
    return "\n".join(lines)


def _cmd_vm_list(args: argparse.Namespace) -> int:
    from liveupdate.emu import hostctl

    state = _state(args)
    names = state.vm_names() if state.exists() else []
    up = hostctl.running(state)
    states = _vm_states(state, names) if up else {}
    rows = [{"name": n, "state": ("running" if _vm_ok(states[n]) else "not running") if up else "host stopped"}
            for n in names]
    if args.json:
        _print_json(rows)
    else:
        for row in rows:
            print(f"{row['name']}\t{row['state']}")
    return exitcodes.OK


# --- luvmm update and the benchmarks ---------------------------------------------------------


def _report_updates(summary: dict, as_json: bool, interrupted: str | None = None) -> int:
    """Print a run of live updates (table or JSON) and return its exit status."""
    from liveupdate.update import format_cycles, outcome

    status, why = outcome(summary)
    if interrupted:
        summary["interrupted"] = interrupted
    if as_json:
        _print_json(summary)
    elif summary["cycles"]:
        print(format_cycles(summary))
    if interrupted:
        _say(interrupted)
        return exitcodes.INTERRUPTED
    if status != exitcodes.OK:
        _say(f"luvmm: {why}")
    return status


def _cmd_update(args: argparse.Namespace) -> int:
    from liveupdate.agent_client import AgentError
    from liveupdate.update import cycle_line, summarize, update_once

    state = _running_host(args)
    if args.abandon:
        return _abandon(state, args.json)
    if not state.vm_names():
        raise CliError(f"no VM runs on the host in {state.path}: nothing to update (`luvmm vm start NAME`)")
    progress = _progress()
    records, failed, interrupted = [], [], None
    try:
        for n in range(1, args.cycles + 1):
            try:
                records.append(update_once(state, timeout=args.timeout))
            except AgentError as e:
                failed.append(f"update {n}/{args.cycles} failed: {e.strerror or e}")
                break
            if progress:
                progress(cycle_line(n, args.cycles, records[-1]))
    except KeyboardInterrupt:
        interrupted = (f"interrupted after {len(records)} of {args.cycles} update(s); one under way is finished or "
                       "rolled back by the host (`luvmm vm status` shows the VMs)")
    summary = summarize(records)
    summary["failed_updates"] = failed
    return _report_updates(summary, args.json, interrupted)


def _abandon(state, as_json: bool) -> int:
    """`luvmm update --abandon`: fail the update under way that will not end by itself."""
    from liveupdate.agent_client import wait_for_agent

    client, _ = wait_for_agent(state, 30)
    try:
        update = client.call({"op": "abandon"})[0]
    finally:
        client.close()
    if as_json:
        _print_json(update)
    elif update is None:
        print("no update was ever made on this host")
    else:
        errors = [r["error"] for r in update.get("reports", {}).values() if r.get("error")]
        print(f"update {update['id']}: {update['phase']}" + (f" ({'; '.join(errors)})" if errors else ""))
    return exitcodes.OK


def _cmd_bench_blackout(args: argparse.Namespace) -> int:
    from luvmm.tools.bench import run_blackout

    summary = run_blackout(memory=args.memory, cycles=args.cycles, vms=args.vms, guest=args.guest,
                           profile=args.kernel_profile, dsa_bandwidth=args.dsa_bandwidth,
                           overcommit=args.overcommit, progress=_progress())
    return _report_updates(summary, args.json)


def _cmd_bench_soak(args: argparse.Namespace) -> int:
    from luvmm.tools.bench import format_soak, run_soak

    result = run_soak(cycles=args.cycles, memory=args.memory, guest=_guest(args.guest),
                      dsa_bandwidth=args.dsa_bandwidth, overcommit=args.overcommit, progress=_progress())
    _print_json(result) if args.json else print(format_soak(result))
    if result["failed_updates"]:
        return exitcodes.FAILED
    damaged = result["fds_leaked"] or any(result[k] for k in ("dma_errors", "dma_lost", "dma_corrupted"))
    return exitcodes.DAMAGED if damaged else exitcodes.OK


def _cmd_bench_chaos(args: argparse.Namespace) -> int:
    from luvmm.tools.chaos import damaged, format_chaos, run_chaos

    if _guest("auto") != "firmware":
        raise CliError("the chaos benchmark needs the firmware guest (a usable /dev/kvm): a synthetic guest's VMM "
                       "cannot be restarted on its VM")
    result = run_chaos(cycles=args.cycles, seed=args.seed, memory=args.memory, progress=_progress())
    _print_json(result) if args.json else print(format_chaos(result))
    return exitcodes.DAMAGED if damaged(result) else exitcodes.OK


def _cmd_bench_scale(args: argparse.Namespace) -> int:
    from luvmm.tools.bench import format_scale, run_scale

    result = run_scale(memories=args.memory, vm_counts=args.vms, cycles=args.cycles, guest=args.guest,
                       dsa_bandwidth=args.dsa_bandwidth, overcommit=args.overcommit, progress=_progress())
    _print_json(result) if args.json else print(format_scale(result))
    return exitcodes.OK


# --- luvmm demo ---------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from luvmm.tools.demo import run_demo
    from liveupdate.update import outcome
    from metrics.report import verdict

    guest = _guest(args.guest)
    result = run_demo(cycles=args.cycles, profile=args.kernel_profile, report_dir=args.report,
                      memory=args.memory, guest_kind=guest, metrics_port=args.metrics_port, keep=args.keep,
                      state_dir=args.state_dir, overcommit=args.overcommit)
    summary = result["summary"]
    _, vtext = verdict(summary, {"kernel_profile": args.kernel_profile})
    print()
    print(vtext)
    if result.get("report"):
        print(f"Report: file://{os.path.abspath(result['report'])}")
    if args.keep:
        print(f"The host and the VM still run: luvmm host stop --state-dir {result['state_dir']}")
    if result.get("interrupted"):
        _say(f"interrupted after {len(summary['updates'])} of {args.cycles} update(s)")
        return exitcodes.INTERRUPTED
    return outcome(summary)[0]


# --- the parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="luvmm",
        description="A userspace VMM whose VM, passed-through PCI device and DMA survive a host "
                    "live update (LUO/KHO + kexec).",
        epilog="Exit status: 0 all good; 1 failed (nothing changed, or put back); 2 bad command line; "
               "3 live updates done but DMA damaged or the guest stuck; 4 live updates done, the VM kept, its "
               "device reset by the kernel (DMA stopped); 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"luvmm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    uapi = sub.add_parser(
        "uapi", help="print the kernel ioctl numbers and struct sizes luvmm uses",
        description="Print every ioctl number and uAPI struct size luvmm uses (KVM, VFIO cdev, "
                    "iommufd, LUO), computed with the kernel's _IOC macros and cffi layouts, "
                    "to compare with a kernel's headers.")
    _json_arg(uapi, '{"IOCTL_NAME": number, "sizeof(struct NAME)": bytes, ...}')
    uapi.set_defaults(func=_cmd_uapi)

    demo = sub.add_parser(
        "demo", help="start here: a VM with a passed-through DSA, live updates, a report",
        description="On an emulated host of its own: start a VM whose guest drives a passed-through DSA, "
                    "live-update the host while DMA runs (a live view shows throughput and each blackout "
                    "with its phases), and write a report with plots (DIR/index.html, PNGs beside it). "
                    "Exit status 0 when DMA went on through every update, 4 when the kernel profile reset "
                    "the device (the reset-on-freeze finding), 3 when DMA was damaged, 1 when an update failed.")
    demo.add_argument("--cycles", type=_positive, default=5, help="live updates (default 5)")
    _profile_arg(demo)
    demo.add_argument("--report", metavar="DIR", default="luvmm-report", help="where to write the report "
                                                                               "(default ./luvmm-report)")
    _memory_args(demo)
    _guest_arg(demo)
    demo.add_argument("--metrics-port", metavar="[ADDRESS:]PORT", type=_listen,
                      help="serve Prometheus metrics: the host's on PORT, the VM's on PORT+1")
    demo.add_argument("--keep", action="store_true", help="leave the host and the VM running afterwards")
    demo.add_argument("--state-dir", metavar="DIR", help="the demo host's state dir (default: a new one in /tmp, "
                                                         "removed afterwards)")
    demo.set_defaults(func=_cmd_demo)

    host = sub.add_parser("host", help="the emulated host: start, stop, status, kexec, faults",
                          description="The emulated host daemon: an emulated machine (Intel DSA devices, IOMMU), "
                                      "its kernel (VFIO cdev, iommufd, LUO, KHO, kexec) and init.")
    host_sub = host.add_subparsers(dest="host_command", metavar="ACTION", parser_class=Parser)
    host_sub.required = True
    start = host_sub.add_parser("start", help="start an emulated host daemon in the background",
                                description="Start an emulated host daemon in the background. VMs defined in the "
                                            "state dir by an earlier run boot again, cold.")
    _state_dir_arg(start)
    start.add_argument("--devices", type=_devices, default=1, help="number of DSA functions, 1-64 (default 1)")
    _profile_arg(start)
    _bandwidth_arg(start)
    start.add_argument("--no-agent", action="store_true", help="do not start the LUO agent unit")
    _metrics_port_arg(start, "the host's (devices, kexecs, units)")
    start.set_defaults(func=_cmd_host_start)
    stop = host_sub.add_parser("stop", help="stop the emulated host (its units are killed)",
                               description="Stop the emulated host: its units are killed and its files removed; "
                                           "the definitions of its VMs stay (a host started there boots them).")
    _state_dir_arg(stop)
    stop.set_defaults(func=_cmd_host_stop)
    status = host_sub.add_parser("status", help="devices, open files, sessions, units, kexec count")
    _state_dir_arg(status)
    _json_arg(status, "the status")
    status.set_defaults(func=_cmd_host_status)
    faults = host_sub.add_parser(
        "faults", help="inject faults into the emulated kernel's live-update path, or clear them",
        description="Fault injection (off unless asked for). A fault is POINT[:HANDLER][@SESSION]=ACTION. "
                    "POINT: preserve, freeze, retrieve, finish (a LUO file handler's callback; HANDLER memfd-v1, "
                    "vfio-pci-v1 or iommufd-v1; SESSION a VM's name), kexec (the reboot call), kho (the image). "
                    "ACTION: fail (EIO), stall:SECONDS, kill:UNIT (init SIGKILLs agent or vm-NAME there), "
                    "clear-bus-master (kexec: the new kernel clears Bus Master Enable of preserved devices), "
                    "corrupt, truncate or skew (kho: damaged, or well-formed but not this kernel's). The same list "
                    "in LUVMM_FAULTS sets them when the host starts. With no argument: the faults in force.")
    _state_dir_arg(faults)
    faults.add_argument("spec", nargs="*", metavar="FAULT", help="faults to add, e.g. freeze:memfd-v1=fail")
    faults.add_argument("--clear", action="store_true", help="remove every fault first")
    _json_arg(faults, "the faults in force")
    faults.set_defaults(func=_cmd_host_faults)
    kexec = host_sub.add_parser(
        "kexec", help="reboot the emulated kernel with kexec (LUO preserves sessions)",
        description="reboot(LINUX_REBOOT_CMD_KEXEC) on the emulated host: LUO freezes and hands over its "
                    "sessions, a new kernel boots, init starts the units again. Refused while VMs run (a bare "
                    "kexec saves no machine state: use `luvmm update`), unless --force.")
    _state_dir_arg(kexec)
    kexec.add_argument("--force", action="store_true", help="kexec even though VMs run (they are lost)")
    _json_arg(kexec, "what the kexec did")
    kexec.set_defaults(func=_cmd_host_kexec)

    vm = sub.add_parser("vm", help="VMs with a passed-through DSA: start, stop, status, list",
                        description="VMs are units of their host: init starts them again, in restore mode, "
                                    "after every kexec, and on the same RAM and device when their VMM dies.")
    vm_sub = vm.add_subparsers(dest="vm_command", metavar="ACTION", parser_class=Parser)
    vm_sub.required = True
    name_help = "the VM's name: 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
    vm_start = vm_sub.add_parser("start", help="start a VM (its guest drives a passed-through DSA)",
                                 description="Start a VM on the host (an emulated host is started there if none "
                                             "runs). Returns once its guest runs.")
    vm_start.add_argument("name", type=_vm_name, help=name_help)
    _state_dir_arg(vm_start)
    _memory_args(vm_start)
    vm_start.add_argument("--vcpus", type=_vcpus, default=1, help="vCPUs, 1-16 (default 1)")
    vm_start.add_argument("--device", default="auto", metavar="BDF|auto",
                          help="the DSA to pass through (default auto: the first free one)")
    _guest_arg(vm_start)
    _metrics_port_arg(vm_start, "the VM's (blackout, phases, DMA continuity, guest counters)")
    vm_start.set_defaults(func=_cmd_vm_start)
    vm_stop = vm_sub.add_parser("stop", help="stop a VM and remove it",
                                description="Stop a VM and remove it: its VMM, its unit, its LUO session and what "
                                            "the agent keeps for it, its device (free for another VM).")
    vm_stop.add_argument("name", type=_vm_name, help=name_help)
    _state_dir_arg(vm_stop)
    vm_stop.set_defaults(func=_cmd_vm_stop)
    vm_status = vm_sub.add_parser("status", help="guest counters, device, interrupts, last update",
                                  description="Each VM's guest counters, device, interrupts and last update. Exit "
                                              "status 1 if a VM named does not exist, or one is not running.")
    vm_status.add_argument("name", nargs="?", type=_vm_name, help="one VM (default: every VM of the host)")
    _state_dir_arg(vm_status)
    _json_arg(vm_status, "{NAME: status}")
    vm_status.set_defaults(func=_cmd_vm_status)
    vm_list = vm_sub.add_parser("list", help="the VMs defined on the host, and whether they run")
    _state_dir_arg(vm_list)
    _json_arg(vm_list, '[{"name", "state"}]')
    vm_list.set_defaults(func=_cmd_vm_list)

    update = sub.add_parser("update", help="live-update the host: prepare every VM, kexec, collect reports",
                            description="Ask the LUO agent for live updates: every VM's VMM prepares (pause, "
                                        "save, preserve), the host kexecs, the VMMs restore and report. Exit "
                                        "status: 0 DMA intact, 1 an update failed (rolled back), 3 DMA damaged, "
                                        "4 the device was reset.")
    _state_dir_arg(update)
    update.add_argument("--cycles", type=_positive, default=1, help="updates in a row (default 1)")
    update.add_argument("--timeout", type=_seconds, default=60.0, help="seconds to wait for each step (default 60)")
    update.add_argument("--abandon", action="store_true",
                        help="fail the update under way instead (one whose restored VMs never all reported): "
                             "the VMs are left as they are, the next update can start")
    _json_arg(update, '{"cycles": [...], "blackout_s": {"p50", "p99", "max"}, ...}')
    update.set_defaults(func=_cmd_update)

    bench = sub.add_parser("bench", help="benchmarks that print figures",
                           description="Benchmarks. Each prints a table, or with --json its figures as JSON.")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK", parser_class=Parser)
    bench_sub.required = True
    dsa = bench_sub.add_parser(
        "dsa", help="the emulated DSA's MEMMOVE path against this machine's memcpy",
        description="MEMMOVE of 4 KiB, 64 KiB and 1 MiB through the full path (portal submit -> IOMMU "
                    "translate -> copy -> completion record), against memcpy of the same sizes in the same "
                    "run; and 64-byte MEMMOVEs per second submitted in batches of 1024.")
    _json_arg(dsa, "memmove_gbps, memcpy_gbps, ratio, descriptors_per_s")
    dsa.add_argument("--bytes", type=_size, default=256 << 20, metavar="SIZE",
                     help="bytes copied per size (default 256M)")
    dsa.add_argument("--batches", type=_positive, default=32, help="batches of 1024 for descriptors/s (default 32)")
    dsa.set_defaults(func=_cmd_bench_dsa)
    blackout = bench_sub.add_parser(
        "blackout", help="live-update blackout over N cycles on a fresh emulated host",
        description="Start a fresh emulated host and VM(s), run N live updates through the agent, print each "
                    "cycle's blackout, phases and DMA continuity, and the p50/p99/max.")
    _memory_args(blackout)
    blackout.add_argument("--cycles", type=_positive, default=20, help="live updates (default 20)")
    blackout.add_argument("--vms", type=_positive, default=1, help="VMs updated in each kexec (default 1)")
    _guest_arg(blackout, auto=False)
    _profile_arg(blackout)
    _bandwidth_arg(blackout)
    _json_arg(blackout, "the `luvmm update --json` document")
    blackout.set_defaults(func=_cmd_bench_blackout)
    scale = bench_sub.add_parser(
        "scale", help="blackout against guest RAM and against the number of VMs per kexec",
        description="Blackout p50/p99/max for each guest RAM size (one VM) and each VM count (the smallest RAM).")
    scale.add_argument("--memory", type=_sizes, default=[256 << 20, 1 << 30, 4 << 30, 16 << 30], metavar="SIZES",
                       help="comma-separated guest RAM sizes (default 256M,1G,4G,16G)")
    scale.add_argument("--overcommit", action="store_true",
                       help="allow VMs whose RAM adds up to more than the machine has")
    scale.add_argument("--vms", type=_counts, default=[1, 2, 4, 8], metavar="COUNTS",
                       help='comma-separated VM counts per kexec (default 1,2,4,8; "" for none)')
    scale.add_argument("--cycles", type=_positive, default=10, help="updates per point (default 10)")
    _guest_arg(scale, auto=False)
    _bandwidth_arg(scale)
    _json_arg(scale, "{memory: {bytes: blackout}, vms: {n: blackout}}")
    scale.set_defaults(func=_cmd_bench_scale)
    soak = bench_sub.add_parser(
        "soak", help="N live updates in a row: DMA damage, fd leaks, memory growth",
        description="Start a fresh emulated host and a VM, run N live updates in a row with DMA running, and "
                    "check that nothing was damaged or leaked: DMA errors, lost and corrupted, the daemon's fds "
                    "and emulated open files, and its RSS (after a warm-up update). Exit status 3 on damage or "
                    "a leak, 1 if an update failed.")
    soak.add_argument("--cycles", type=_positive, default=100, help="live updates (default 100)")
    _memory_args(soak)
    _guest_arg(soak)
    _bandwidth_arg(soak)
    _json_arg(soak, "{cycles, dma_errors, dma_lost, dma_corrupted, fds_leaked, rss_growth_bytes, blackout_s, ...}")
    soak.set_defaults(func=_cmd_bench_soak)
    chaos = bench_sub.add_parser(
        "chaos", help="live updates of two VMs with random kills, stalls and a full disk",
        description="Start a fresh emulated host and two VMs, and run N live updates; at a random moment of "
                    "each, kill the agent, a VMM or both, stall a step, or fill the disk (as root: the state dir "
                    "is then a tmpfs). Checks that every VM survives (its guest's counters go on, never a cold "
                    "boot), no update is left stuck and no DMA is damaged; an update may fail (rolled back). "
                    "Exit status 3 if any of that did not hold.")
    chaos.add_argument("--cycles", type=_positive, default=50, help="live updates (default 50)")
    chaos.add_argument("--seed", type=int, help="the random seed (default: a new one, printed)")
    chaos.add_argument("--memory", type=_memory, default=64 << 20, metavar="SIZE",
                       help="each VM's RAM (default 64M)")
    _json_arg(chaos, "{cycles, seed, actions, updates_ok, updates_failed, vms_lost, stuck_updates, dma_*, ...}")
    chaos.set_defaults(func=_cmd_bench_chaos)

    from luvmm.lab.cli import add_parser as add_lab_parser

    add_lab_parser(sub)
    return parser


def _expected_errors() -> tuple[type, ...]:
    """The errors that are a refusal, said in one line -- not bugs."""
    from liveupdate.agent_client import AgentError
    from liveupdate.emu.hostctl import HostError
    from liveupdate.state import StateError
    from vmm.manage import VmError

    return CliError, HostError, StateError, VmError, AgentError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    what = " ".join(x for x in (args.command, getattr(args, "host_command", None), getattr(args, "vm_command", None),
                                getattr(args, "bench", None)) if x)
    try:
        return args.func(args)
    except BrokenPipeError:  # `luvmm uapi | head`
        sys.stderr.close()
        return exitcodes.OK
    except KeyboardInterrupt:
        _say(f"luvmm {what}: interrupted")
        return exitcodes.INTERRUPTED
    except Exception as e:
        if isinstance(e, _expected_errors()):
            _say(f"luvmm {what}: {e.strerror if isinstance(e, OSError) and e.strerror else e}")
            return getattr(e, "status", exitcodes.FAILED)
        if isinstance(e, OSError):  # the system said no (a file, a socket): say what
            where = f" ({e.filename})" if e.filename else ""
            _say(f"luvmm {what}: {e.strerror or e}{where}")
            return exitcodes.FAILED
        raise
