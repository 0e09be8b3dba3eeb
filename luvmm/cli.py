"""The `luvmm` command line.

Each subcommand imports what it needs when it runs, so `luvmm --help` and the
restore path stay fast.
"""

from __future__ import annotations

import argparse
import json
import sys

from luvmm import __version__


def _cmd_uapi(args: argparse.Namespace) -> int:
    from luvmm.uapi import format_table, uapi_values

    values = uapi_values()
    if args.json:
        json.dump(values, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(values))
    return 0


def _write_json(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


def _cmd_bench_dsa(args: argparse.Namespace) -> int:
    from devices.dsa_bench import format_table, run

    result = run(total_bytes=args.bytes, batches=args.batches)
    print(format_table(result))
    _write_json(args.json, result)
    return 0


DEFAULT_DSA_BANDWIDTH = 64 << 20


def _size(text: str) -> int:
    """A byte count with an optional K/M/G suffix (powers of two)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _state_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", metavar="DIR",
                   help="the emulated host to use (default: $LUVMM_STATE_DIR, else $XDG_RUNTIME_DIR/luvmm, "
                        "else /tmp/luvmm-UID; started there if none is running)")


def _metrics_port_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--metrics-port", metavar="[ADDRESS:]PORT", type=_listen,
                   help=f"serve {what} Prometheus metrics over HTTP at /metrics (on loopback unless ADDRESS "
                        "is given); README.md lists them")


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


def _host(args: argparse.Namespace):
    from liveupdate.hostctl import ensure

    return ensure(args.state_dir, say=lambda m: print(m, file=sys.stderr), dsa_bandwidth=DEFAULT_DSA_BANDWIDTH)


def _cmd_host_start(args: argparse.Namespace) -> int:
    from liveupdate import hostctl
    from liveupdate.state import StateDir, default_state_dir

    state = StateDir(args.state_dir or default_state_dir())
    if hostctl.running(state):
        print(f"an emulated host is already running in {state.path}", file=sys.stderr)
        return 1
    pid = hostctl.start(state, devices=args.devices, profile=args.kernel_profile,
                        dsa_bandwidth=args.dsa_bandwidth or None, agent=not args.no_agent,
                        metrics_port=args.metrics_port)
    print(f"emulated host running in {state.path} (pid {pid}, {args.devices} DSA, kernel profile "
          f"{args.kernel_profile}); control socket {state.socket}")
    if args.metrics_port is not None:
        print(f"Prometheus metrics on http://{_metrics_url(args.metrics_port)}/metrics")
    return 0


def _cmd_host_stop(args: argparse.Namespace) -> int:
    from liveupdate import hostctl
    from liveupdate.state import StateDir, default_state_dir

    state = StateDir(args.state_dir or default_state_dir())
    if not hostctl.stop(state):
        print(f"no emulated host is running in {state.path}", file=sys.stderr)
        return 0
    print(f"stopped the emulated host in {state.path}")
    return 0


def _cmd_host_status(args: argparse.Namespace) -> int:
    from liveupdate.hostctl import format_status
    from luvmm.emuhost import connect

    state = _host(args)
    host = connect(state.socket)
    status = host.call({"op": "status"})[0]
    host.close_connection()
    if args.json:
        json.dump(status, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_status(status))
    return 0


def _cmd_host_faults(args: argparse.Namespace) -> int:
    from luvmm.emuhost import connect

    state = _host(args)
    host = connect(state.socket)
    try:
        request = {"op": "faults", "clear": args.clear}
        if args.spec:
            request["set"] = ",".join(args.spec)
        rules = host.call(request)[0]
    except OSError as e:
        print(f"luvmm host faults: {e.strerror or e}", file=sys.stderr)
        return 2
    finally:
        host.close_connection()
    print("\n".join(rules) if rules else "no faults injected")
    return 0


def _cmd_host_kexec(args: argparse.Namespace) -> int:
    from luvmm.emuhost import connect

    state = _host(args)
    host = connect(state.socket)
    try:
        info = host.kexec()
    except OSError as e:
        print(f"kexec failed: {e.strerror} (errno {e.errno}); the old kernel is still running", file=sys.stderr)
        return 1
    finally:
        host.close_connection()
    print(f"kexec done: generation {info['generation']}, {info['seconds'] * 1000:.1f} ms, KHO image "
          f"{info['kho_bytes']} bytes")
    if info.get("kho_error"):
        print(f"the new kernel refused the KHO image: {info['kho_error']}", file=sys.stderr)
        return 1
    return 0


def _guest(choice: str) -> str:
    """--guest auto: the firmware under KVM where /dev/kvm is usable, else the synthetic guest."""
    if choice != "auto":
        return choice
    from vmm.kvm import kvm_available

    ok, why = kvm_available()
    if not ok:
        print(f"no usable KVM ({why}): running the synthetic guest", file=sys.stderr)
    return "firmware" if ok else "synthetic"


def _cmd_vm_start(args: argparse.Namespace) -> int:
    from luvmm.emuhost import connect
    from vmm import manage
    from vmm.vm import VmConfig

    guest = _guest(args.guest)
    config = VmConfig(args.name, memory=args.memory, vcpus=args.vcpus, device=args.device, guest=guest,
                      metrics=args.metrics_port)
    try:
        config.check()
    except ValueError as e:
        print(f"luvmm vm start: {e}", file=sys.stderr)
        return 2
    state = _host(args)
    host = connect(state.socket)
    try:
        st = manage.start(state, config, host)
    except manage.VmError as e:
        print(f"luvmm vm start: {e}", file=sys.stderr)
        return 1
    finally:
        host.close_connection()
    print(f"VM {args.name} running (pid {st['pid']}, {args.memory >> 20} MiB, {args.vcpus} vCPU, DSA {st['bdf']}, "
          f"{guest} guest)")
    if st.get("metrics_error"):
        print(f"luvmm vm start: {st['metrics_error']}", file=sys.stderr)
    elif st.get("metrics_port") is not None:
        print(f"Prometheus metrics on http://{_metrics_url(args.metrics_port)}/metrics")
    return 0


def _cmd_vm_stop(args: argparse.Namespace) -> int:
    from luvmm.emuhost import connect
    from vmm import manage

    state = _host(args)
    host = connect(state.socket)
    try:
        if not manage.stop(state, args.name, host):
            print(f"no VM {args.name!r}", file=sys.stderr)
            return 1
    finally:
        host.close_connection()
    print(f"VM {args.name} stopped")
    return 0


def _cmd_vm_status(args: argparse.Namespace) -> int:
    from vmm import manage

    state = _host(args)
    names = [args.name] if args.name else manage.names(state)
    out = {}
    for name in names:
        try:
            out[name] = manage.status(state, name)
        except (OSError, manage.VmError) as e:
            out[name] = {"error": str(e)}
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for name, st in out.items():
        if "error" in st:
            print(f"{name}: not answering ({st['error']})")
            continue
        mb = st["mailbox"]
        print(f"{name}: pid {st['pid']} ({st['boot']} boot), guest {st['guest_state']}, DSA {st['bdf']}, "
              f"heartbeat {mb['heartbeat']}, batches {mb['completed']}/{mb['submitted']} "
              f"({mb['descs_ok']} descriptors ok, {mb['errors']} errors, {mb['verify_failures']} corrupted), "
              f"interrupts {st['interrupts']}" + (f", CRASHED: {st['crash']}" if st["crash"] else ""))
    return 0


def _cmd_vm_list(args: argparse.Namespace) -> int:
    from vmm import manage

    state = _host(args)
    for name in manage.names(state):
        print(name)
    return 0


def _cmd_update(args: argparse.Namespace) -> int:
    from liveupdate.agent_client import AgentError
    from liveupdate.update import format_cycles, summarize, update_once

    state = _host(args)
    records = []
    failed = None
    for n in range(args.cycles):
        try:
            records.append(update_once(state, timeout=args.timeout))
        except AgentError as e:
            failed = f"update {n + 1}/{args.cycles} failed: {e.strerror or e}"
            break
    summary = summarize(records)
    if failed:
        summary["failed"] = failed
    if records:
        print(format_cycles(summary))
    if failed:
        print(failed, file=sys.stderr)
    _write_json(args.json, summary)
    return 1 if failed else 0


def _cmd_bench_blackout(args: argparse.Namespace) -> int:
    from liveupdate.update import format_cycles
    from vmm.bench import run_blackout

    summary = run_blackout(memory=args.memory, cycles=args.cycles, vms=args.vms, guest=args.guest,
                           profile=args.kernel_profile, dsa_bandwidth=args.dsa_bandwidth)
    print(format_cycles(summary))
    _write_json(args.json, summary)
    return 0


def _cmd_bench_soak(args: argparse.Namespace) -> int:
    from vmm.bench import format_soak, print_progress, run_soak

    result = run_soak(cycles=args.cycles, memory=args.memory, guest=_guest(args.guest),
                      dsa_bandwidth=args.dsa_bandwidth, progress=print_progress)
    print(format_soak(result))
    _write_json(args.json, result)
    bad = result["failed_updates"] or result["fds_leaked"] or any(
        result[k] for k in ("dma_errors", "dma_lost", "dma_corrupted"))
    return 1 if bad else 0


def _cmd_bench_scale(args: argparse.Namespace) -> int:
    from vmm.bench import format_scale, run_scale

    result = run_scale(memories=[_size(m) for m in args.memory.split(",")],
                       vm_counts=[int(v) for v in args.vms.split(",") if v], cycles=args.cycles, guest=args.guest,
                       dsa_bandwidth=args.dsa_bandwidth)
    print(format_scale(result))
    _write_json(args.json, result)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import os

    from luvmm.demo import DemoError, run_demo

    guest = _guest(args.guest)
    try:
        result = run_demo(cycles=args.cycles, profile=args.kernel_profile, report_dir=args.report,
                          memory=args.memory, guest_kind=guest, metrics_port=args.metrics_port, keep=args.keep,
                          state_dir=args.state_dir)
    except DemoError as e:
        print(f"luvmm demo: {e}", file=sys.stderr)
        return 1
    from metrics.report import verdict

    summary = result["summary"]
    vclass, vtext = verdict(summary, {"kernel_profile": args.kernel_profile})
    print()
    print(vtext)
    print(f"Report: file://{os.path.abspath(result['report'])}")
    if args.keep:
        print(f"The host and the VM still run: luvmm host stop --state-dir {result['state_dir']}")
    # Exit 1 when an update failed or damaged DMA it should have kept (not for reset-on-freeze's finding).
    return 1 if vclass == "bad" or summary["failed_updates"] else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="luvmm",
        description="A userspace VMM whose VM, passed-through PCI device and DMA survive a host "
                    "live update (LUO/KHO + kexec).",
    )
    parser.add_argument("--version", action="version", version=f"luvmm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    uapi = sub.add_parser(
        "uapi", help="print the kernel ioctl numbers and struct sizes luvmm uses",
        description="Print every ioctl number and uAPI struct size luvmm uses (KVM, VFIO cdev, "
                    "iommufd, LUO), computed with the kernel's _IOC macros and cffi layouts, "
                    "to compare with a kernel's headers.")
    uapi.add_argument("--json", action="store_true",
                      help='one JSON object: {"IOCTL_NAME": number, "sizeof(struct NAME)": bytes, ...}')
    uapi.set_defaults(func=_cmd_uapi)

    demo = sub.add_parser(
        "demo", help="start here: a VM with a passed-through DSA, live updates, a report",
        description="On an emulated host of its own: start a VM whose guest drives a passed-through DSA, "
                    "live-update the host while DMA runs (a live view shows throughput and each blackout "
                    "with its phases), and write a report with plots (DIR/index.html, PNGs beside it).")
    demo.add_argument("--cycles", type=_positive, default=5, help="live updates (default 5)")
    demo.add_argument("--kernel-profile", choices=("continuous-dma", "reset-on-freeze"), default="continuous-dma",
                      help="continuous-dma (default): the preserved device DMAs through the kexec; "
                           "reset-on-freeze: the upstream behaviour, the device is reset (the contrast)")
    demo.add_argument("--report", metavar="DIR", default="luvmm-report", help="where to write the report "
                                                                               "(default ./luvmm-report)")
    demo.add_argument("--memory", type=_size, default=256 << 20, metavar="SIZE", help="guest RAM (default 256M)")
    demo.add_argument("--guest", choices=("auto", "firmware", "synthetic"), default="auto",
                      help="auto (default): the firmware under KVM where /dev/kvm is usable, else synthetic")
    demo.add_argument("--metrics-port", metavar="[ADDRESS:]PORT", type=_listen,
                      help="serve Prometheus metrics: the host's on PORT, the VM's on PORT+1")
    demo.add_argument("--keep", action="store_true", help="leave the host and the VM running afterwards")
    demo.add_argument("--state-dir", metavar="DIR", help="the demo host's state dir (default: a new one in /tmp)")
    demo.set_defaults(func=_cmd_demo)

    host = sub.add_parser("host", help="the emulated host: start, stop, status, kexec, faults",
                          description="The emulated host daemon: an emulated machine (Intel DSA devices, IOMMU), "
                                      "its kernel (VFIO cdev, iommufd, LUO, KHO, kexec) and init.")
    host_sub = host.add_subparsers(dest="host_command", metavar="ACTION")
    host_sub.required = True
    start = host_sub.add_parser("start", help="start an emulated host daemon in the background")
    _state_dir_arg(start)
    start.add_argument("--devices", type=int, default=1, help="number of DSA functions (default 1)")
    start.add_argument("--kernel-profile", choices=("continuous-dma", "reset-on-freeze"), default="continuous-dma",
                       help="what the kernel does to a preserved device (default continuous-dma)")
    start.add_argument("--dsa-bandwidth", type=_size, default=DEFAULT_DSA_BANDWIDTH, metavar="BYTES",
                       help="bytes per second each DSA moves, e.g. 1G, or 0 for as fast as memcpy (default 64M: "
                            "slow enough that work queued before a live update outlasts its blackout)")
    start.add_argument("--no-agent", action="store_true", help="do not start the LUO agent unit")
    _metrics_port_arg(start, "the host's (devices, kexecs, units)")
    start.set_defaults(func=_cmd_host_start)
    stop = host_sub.add_parser("stop", help="stop the emulated host (its units are killed)")
    _state_dir_arg(stop)
    stop.set_defaults(func=_cmd_host_stop)
    status = host_sub.add_parser("status", help="devices, open files, sessions, units, kexec count")
    _state_dir_arg(status)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=_cmd_host_status)
    faults = host_sub.add_parser(
        "faults", help="inject faults into the emulated kernel's live-update path, or clear them",
        description="Fault injection (off unless asked for). A fault is POINT[:HANDLER][@SESSION]=ACTION. "
                    "POINT: preserve, freeze, retrieve, finish (a LUO file handler's callback; HANDLER memfd-v1, "
                    "vfio-pci-v1 or iommufd-v1; SESSION a VM's name), kexec (the reboot call), kho (the image). "
                    "ACTION: fail (EIO), stall:SECONDS, kill:UNIT (init SIGKILLs agent or vm-NAME there), "
                    "clear-bus-master (kexec: the new kernel clears Bus Master Enable of preserved devices), "
                    "corrupt, truncate or skew (kho: damaged, or well-formed but not this kernel's). The same list in LUVMM_FAULTS sets them when the host starts. "
                    "With no argument: the faults in force.")
    _state_dir_arg(faults)
    faults.add_argument("spec", nargs="*", metavar="FAULT", help="faults to add, e.g. freeze:memfd-v1=fail")
    faults.add_argument("--clear", action="store_true", help="remove every fault first")
    faults.set_defaults(func=_cmd_host_faults)
    kexec = host_sub.add_parser("kexec", help="reboot the emulated kernel with kexec (LUO preserves sessions)")
    _state_dir_arg(kexec)
    kexec.set_defaults(func=_cmd_host_kexec)

    vm = sub.add_parser("vm", help="VMs with a passed-through DSA: start, stop, status, list",
                        description="VMs are units of their host: init starts them again, in restore mode, "
                                    "after every kexec, and on the same RAM and device when their VMM dies.")
    vm_sub = vm.add_subparsers(dest="vm_command", metavar="ACTION")
    vm_sub.required = True
    vm_start = vm_sub.add_parser("start", help="start a VM (its guest drives a passed-through DSA)")
    vm_start.add_argument("name")
    _state_dir_arg(vm_start)
    vm_start.add_argument("--memory", type=_size, default=256 << 20, metavar="SIZE", help="guest RAM (default 256M)")
    vm_start.add_argument("--vcpus", type=int, default=1, help="vCPUs (default 1)")
    vm_start.add_argument("--device", default="auto", metavar="BDF|auto", help="the DSA to pass through")
    vm_start.add_argument("--guest", choices=("auto", "firmware", "synthetic"), default="auto",
                          help="firmware: the guest firmware under KVM; synthetic: the same DMA workload "
                               "driven from the host side (no KVM needed); auto (default): firmware where "
                               "/dev/kvm is usable")
    _metrics_port_arg(vm_start, "the VM's (blackout, phases, DMA continuity, guest counters)")
    vm_start.set_defaults(func=_cmd_vm_start)
    vm_stop = vm_sub.add_parser("stop", help="stop a VM and remove its unit")
    vm_stop.add_argument("name")
    _state_dir_arg(vm_stop)
    vm_stop.set_defaults(func=_cmd_vm_stop)
    vm_status = vm_sub.add_parser("status", help="guest counters, device, interrupts, last update")
    vm_status.add_argument("name", nargs="?")
    _state_dir_arg(vm_status)
    vm_status.add_argument("--json", action="store_true")
    vm_status.set_defaults(func=_cmd_vm_status)
    vm_list = vm_sub.add_parser("list", help="the VMs of the host")
    _state_dir_arg(vm_list)
    vm_list.set_defaults(func=_cmd_vm_list)

    update = sub.add_parser("update", help="live-update the host: prepare every VM, kexec, collect reports",
                            description="Ask the LUO agent for live updates: every registered VMM prepares "
                                        "(pause, save, preserve), the host kexecs, the VMMs restore and report.")
    _state_dir_arg(update)
    update.add_argument("--cycles", type=_positive, default=1, help="updates in a row (default 1)")
    update.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each step (default 60)")
    update.add_argument("--json", metavar="FILE", help="write every cycle's record as JSON")
    update.set_defaults(func=_cmd_update)

    bench = sub.add_parser("bench", help="benchmarks that print figures (and write them as JSON)",
                           description="Benchmarks. Each prints a table and, with --json FILE, writes its figures.")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK")
    bench_sub.required = True
    dsa = bench_sub.add_parser(
        "dsa", help="the emulated DSA's MEMMOVE path against this machine's memcpy",
        description="MEMMOVE of 4 KiB, 64 KiB and 1 MiB through the full path (portal submit -> IOMMU "
                    "translate -> copy -> completion record), against memcpy of the same sizes in the same "
                    "run; and 64-byte MEMMOVEs per second submitted in batches of 1024.")
    dsa.add_argument("--json", metavar="FILE", help="write memmove_gbps, memcpy_gbps, ratio, descriptors_per_s")
    dsa.add_argument("--bytes", type=int, default=256 << 20, help="bytes copied per size (default 256 MiB)")
    dsa.add_argument("--batches", type=int, default=32, help="batches of 1024 for descriptors/s (default 32)")
    dsa.set_defaults(func=_cmd_bench_dsa)
    blackout = bench_sub.add_parser(
        "blackout", help="live-update blackout over N cycles on a fresh emulated host",
        description="Start a fresh emulated host and VM(s), run N live updates through the agent, print each "
                    "cycle's blackout, phases and DMA continuity, and the p50/p99/max.")
    blackout.add_argument("--memory", type=_size, default=1 << 30, metavar="SIZE", help="guest RAM (default 1G)")
    blackout.add_argument("--cycles", type=_positive, default=20, help="live updates (default 20)")
    blackout.add_argument("--vms", type=int, default=1, help="VMs updated in each kexec (default 1)")
    blackout.add_argument("--guest", choices=("firmware", "synthetic"), default="firmware")
    blackout.add_argument("--kernel-profile", choices=("continuous-dma", "reset-on-freeze"), default="continuous-dma")
    blackout.add_argument("--dsa-bandwidth", type=_size, default=64 << 20, metavar="BYTES",
                          help="DSA bytes per second (default 64M: work queued before the pause outlasts it)")
    blackout.add_argument("--json", metavar="FILE", help="write the luvmm update document")
    blackout.set_defaults(func=_cmd_bench_blackout)
    scale = bench_sub.add_parser(
        "scale", help="blackout against guest RAM and against the number of VMs per kexec",
        description="Blackout p50/p99/max for each guest RAM size (one VM) and each VM count (the smallest RAM).")
    scale.add_argument("--memory", default="256M,1G,4G,16G", help="comma-separated RAM sizes (default 256M,1G,4G,16G)")
    scale.add_argument("--vms", default="1,2,4,8", help="comma-separated VM counts per kexec (default 1,2,4,8; \"\" for none)")
    scale.add_argument("--cycles", type=_positive, default=10, help="updates per point (default 10)")
    scale.add_argument("--guest", choices=("firmware", "synthetic"), default="firmware")
    scale.add_argument("--dsa-bandwidth", type=_size, default=64 << 20, metavar="BYTES")
    scale.add_argument("--json", metavar="FILE", help="write {memory: {bytes: blackout}, vms: {n: blackout}}")
    scale.set_defaults(func=_cmd_bench_scale)
    soak = bench_sub.add_parser(
        "soak", help="N live updates in a row: DMA damage, fd leaks, memory growth",
        description="Start a fresh emulated host and a VM, run N live updates in a row with DMA running, and "
                    "check that nothing was damaged or leaked: DMA errors, lost and corrupted, the daemon's fds "
                    "and emulated open files, and its RSS (after a warm-up update). Exits 1 on damage or a leak.")
    soak.add_argument("--cycles", type=_positive, default=100, help="live updates (default 100)")
    soak.add_argument("--memory", type=_size, default=256 << 20, metavar="SIZE", help="guest RAM (default 256M)")
    soak.add_argument("--guest", choices=("auto", "firmware", "synthetic"), default="auto")
    soak.add_argument("--dsa-bandwidth", type=_size, default=64 << 20, metavar="BYTES")
    soak.add_argument("--json", metavar="FILE", help="write {cycles, dma_errors, dma_lost, dma_corrupted, "
                                                      "fds_leaked, rss_growth_bytes, blackout_s, ...}")
    soak.set_defaults(func=_cmd_bench_soak)

    from luvmm.lab.cli import add_parser as add_lab_parser
    add_lab_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `luvmm uapi | head`
        sys.stderr.close()
        return 0
