"""`luvmm bench`: benchmarks that print figures."""

from __future__ import annotations

import argparse

from luvmm import exitcodes
from luvmm.cli.common import (
    report_updates,
    CliError,
    Parser,
    bandwidth_arg,
    check_json_file,
    guest_cpus_arg,
    count_list,
    cpu_list,
    emit,
    guest_arg,
    guest_memories,
    guest_memory,
    host_arg,
    json_arg,
    memory_args,
    pick_guest,
    positive_int,
    profile_arg,
    progress,
    byte_size,
)


def _cmd_bench_dsa(args: argparse.Namespace) -> int:
    check_json_file(args.json)
    from luvmm.devices.emu.dsa_bench import format_table, run

    result = run(total_bytes=args.bytes, batches=args.batches)
    emit(result, args.json, lambda: format_table(result))
    return exitcodes.OK



def _cmd_bench_blackout(args: argparse.Namespace) -> int:
    check_json_file(args.json)
    from luvmm.tools.bench import guest_cpus_for, run_blackout

    summary = run_blackout(memory=args.memory, cycles=args.cycles, vms=args.vms, guest=args.guest,
                           profile=args.kernel_profile, dsa_bandwidth=args.dsa_bandwidth,
                           overcommit=args.overcommit, guest_cpus=guest_cpus_for(args.guest_cpus, args.vms),
                           interval=args.interval, progress=progress())
    return report_updates(summary, args.json, command="bench blackout")


def _cmd_bench_load(args: argparse.Namespace) -> int:
    check_json_file(args.json)
    from luvmm.tools.bench import guest_cpus_for
    from luvmm.tools.load import format_load, run_load

    if pick_guest("auto") != "firmware":
        raise CliError("the load benchmark measures a KVM guest's pace: it needs a usable /dev/kvm")
    result = run_load(clients=args.clients, seconds=args.seconds, rounds=args.rounds, memory=args.memory,
                      guest_cpus=guest_cpus_for(args.guest_cpus, 1), progress=progress())
    emit(result, args.json, lambda: format_load(result))
    return exitcodes.OK


def _cmd_bench_shootdown(args: argparse.Namespace) -> int:
    check_json_file(args.json)
    from luvmm.tools.bench import guest_cpus_for
    from luvmm.tools.shootdown import format_shootdown, run_shootdown

    if pick_guest("auto") != "firmware":
        raise CliError("the shootdown benchmark measures a KVM guest's pace: it needs a usable /dev/kvm")
    cpus = guest_cpus_for(args.guest_cpus, 1)
    if cpus is None:
        raise CliError("the shootdown benchmark needs a CPU for the vCPU and another to send from")
    try:
        result = run_shootdown(guest_cpus=cpus, seconds=args.seconds, rounds=args.rounds, progress=progress())
    except ValueError as e:
        raise CliError(str(e)) from None
    emit(result, args.json, lambda: format_shootdown(result))
    return exitcodes.OK


def _cmd_bench_soak(args: argparse.Namespace) -> int:
    check_json_file(args.json)
    from luvmm.tools.bench import format_soak, run_soak

    result = run_soak(cycles=args.cycles, memory=args.memory, guest=pick_guest(args.guest),
                      dsa_bandwidth=args.dsa_bandwidth, overcommit=args.overcommit, progress=progress())
    emit(result, args.json, lambda: format_soak(result))
    if result["failed_updates"]:
        return exitcodes.FAILED
    damaged = result["fds_leaked"] or any(result[k] for k in ("dma_errors", "dma_lost", "dma_corrupted"))
    return exitcodes.DAMAGED if damaged else exitcodes.OK


def _cmd_bench_chaos(args: argparse.Namespace) -> int:
    check_json_file(args.json)
    from luvmm.tools.chaos import damaged, format_chaos, run_chaos

    if pick_guest("auto") != "firmware":
        raise CliError("the chaos benchmark needs the firmware guest (a usable /dev/kvm): a synthetic guest's VMM "
                       "cannot be restarted on its VM")
    result = run_chaos(cycles=args.cycles, seed=args.seed, memory=args.memory, progress=progress())
    emit(result, args.json, lambda: format_chaos(result))
    return exitcodes.DAMAGED if damaged(result) else exitcodes.OK


def _cmd_bench_scale(args: argparse.Namespace) -> int:
    check_json_file(args.json)
    from luvmm.tools.bench import format_scale, run_scale

    result = run_scale(memories=args.memory, vm_counts=args.vms, cycles=args.cycles, guest=args.guest,
                       dsa_bandwidth=args.dsa_bandwidth, overcommit=args.overcommit, progress=progress())
    emit(result, args.json, lambda: format_scale(result))
    return exitcodes.OK


BENCH_EMULATED_ONLY = "the benchmarks run on a fresh emulated host of their own only"


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print figures",
                           description="Benchmarks. Each prints a table, or with --json its figures as JSON.")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK", parser_class=Parser)
    bench_sub.required = True
    dsa = bench_sub.add_parser(
        "dsa", help="the emulated DSA's MEMMOVE path against this machine's memcpy",
        description="MEMMOVE of 4 KiB, 64 KiB and 1 MiB through the full path (portal submit -> IOMMU "
                    "translate -> copy -> completion record), against memcpy of the same sizes in the same "
                    "run; and 64-byte MEMMOVEs per second submitted in batches of 1024.")
    json_arg(dsa, "memmove_gbps, memcpy_gbps, ratio, descriptors_per_s", to_file=True)
    dsa.add_argument("--bytes", type=byte_size, default=256 << 20, metavar="SIZE",
                     help="bytes copied per size (default 256M)")
    dsa.add_argument("--batches", type=positive_int, default=32, help="batches of 1024 for descriptors/s (default 32)")
    dsa.set_defaults(func=_cmd_bench_dsa)
    blackout = bench_sub.add_parser(
        "blackout", help="live-update blackout over N cycles on a fresh emulated host",
        description="Start a fresh emulated host and VM(s), run N live updates through the agent, print each "
                    "cycle's blackout, the guest time lost after it and the time until the guest was back at "
                    "pace (the bus observer's view of its heartbeat), phases and DMA continuity, and the "
                    "p50/p99/max of the blackout and of the guest's outage.")
    memory_args(blackout)
    blackout.add_argument("--cycles", type=positive_int, default=20, help="live updates (default 20)")
    blackout.add_argument("--vms", type=positive_int, default=1, help="VMs updated in each kexec (default 1)")
    blackout.add_argument("--interval", type=float, default=0.0, metavar="S",
                          help="start each update S seconds after the last (default: 0.5 s after it ended, what the "
                               "guest's pace before the next pause is measured over)")
    guest_arg(blackout, auto=False)
    profile_arg(blackout)
    bandwidth_arg(blackout)
    guest_cpus_arg(blackout, "auto")
    json_arg(blackout, "the `luvmm update --json` document", to_file=True)
    host_arg(blackout, BENCH_EMULATED_ONLY)
    blackout.set_defaults(func=_cmd_bench_blackout)
    load = bench_sub.add_parser(
        "load", help="the guest's pace while clients scrape its metrics and ask its status",
        description="Start a fresh emulated host and a firmware VM serving Prometheus metrics; measure its guest's "
                    "heartbeat pace (the bus observer's) over windows with nobody asking and windows in which "
                    "CLIENTS client threads of this process each scrape /metrics and ask the VMM's status (what "
                    "`luvmm vm status` asks) without pause, alternating; print both paces and their ratio. The clients run "
                    "off the guest CPUs where some are set apart, as the rest of such a host would.")
    load.add_argument("--clients", type=positive_int, default=8, help="client threads (default 8)")
    load.add_argument("--seconds", type=float, default=2.0, help="each window's length (default 2)")
    load.add_argument("--rounds", type=positive_int, default=3, help="idle/loaded pairs of windows (default 3)")
    load.add_argument("--memory", type=guest_memory, default=256 << 20, metavar="SIZE", help="guest RAM (default 256M)")
    guest_cpus_arg(load, "auto")
    json_arg(load, "{idle_pace_hz, loaded_pace_hz, ratios, ratio_mean, ratio_min, scrapes, statuses, ...}",
             to_file=True)
    host_arg(load, BENCH_EMULATED_ONLY)
    load.set_defaults(func=_cmd_bench_load)
    shootdown = bench_sub.add_parser(
        "shootdown", help="what a TLB shootdown into its CPU costs a guest",
        description="Start a fresh emulated host and a firmware VM whose VMM is this process, its vCPU on a CPU of "
                    "its own; measure the guest's heartbeat pace over windows with this process idle and windows "
                    "in which it flips the protection of a few of its pages (each flip to read-only shoots down "
                    "the TLB of the vCPU's CPU: the kernel's count, /proc/interrupts), alternating; print the "
                    "guest time each shootdown cost. Why the VMM's control plane runs in a process of its own.")
    shootdown.add_argument("--seconds", type=float, default=1.0, help="each window's length (default 1)")
    shootdown.add_argument("--rounds", type=positive_int, default=3, help="idle/flipping pairs of windows (default 3)")
    shootdown.add_argument("--guest-cpus", type=lambda t: t if t == "auto" else cpu_list(t), default="auto",
                           metavar="CPU|auto", help="the vCPU's CPU (auto, the default: the highest-numbered)")
    json_arg(shootdown, "{rounds: [{idle_pace_hz, flipping_pace_hz, shootdowns, us_per_shootdown}], "
                        "us_per_shootdown_p50}", to_file=True)
    host_arg(shootdown, BENCH_EMULATED_ONLY)
    shootdown.set_defaults(func=_cmd_bench_shootdown)
    scale = bench_sub.add_parser(
        "scale", help="blackout against guest RAM and against the number of VMs per kexec",
        description="Blackout p50/p99/max for each guest RAM size (one VM) and each VM count (the smallest RAM).")
    scale.add_argument("--memory", type=guest_memories, default=[256 << 20, 1 << 30, 4 << 30, 16 << 30], metavar="SIZES",
                       help="comma-separated guest RAM sizes (default 256M,1G,4G,16G)")
    scale.add_argument("--overcommit", action="store_true",
                       help="allow VMs whose RAM adds up to more than the machine has")
    scale.add_argument("--vms", type=count_list, default=[1, 2, 4, 8], metavar="COUNTS",
                       help='comma-separated VM counts per kexec (default 1,2,4,8; "" for none)')
    scale.add_argument("--cycles", type=positive_int, default=10, help="updates per point (default 10)")
    guest_arg(scale, auto=False)
    bandwidth_arg(scale)
    json_arg(scale, "{memory: {bytes: blackout}, vms: {n: blackout}}", to_file=True)
    host_arg(scale, BENCH_EMULATED_ONLY)
    scale.set_defaults(func=_cmd_bench_scale)
    soak = bench_sub.add_parser(
        "soak", help="N live updates in a row: DMA damage, fd leaks, memory growth",
        description="Start a fresh emulated host and a VM, run N live updates in a row with DMA running, and "
                    "check that nothing was damaged or leaked: DMA errors, lost and corrupted, the daemon's fds "
                    "and emulated open files, and its RSS (after a warm-up update). Exit status 3 on damage or "
                    "a leak, 1 if an update failed.")
    soak.add_argument("--cycles", type=positive_int, default=100, help="live updates (default 100)")
    memory_args(soak)
    guest_arg(soak)
    bandwidth_arg(soak)
    json_arg(soak, "{cycles, dma_errors, dma_lost, dma_corrupted, fds_leaked, rss_growth_bytes, blackout_s, ...}", to_file=True)
    host_arg(soak, BENCH_EMULATED_ONLY)
    soak.set_defaults(func=_cmd_bench_soak)
    chaos = bench_sub.add_parser(
        "chaos", help="live updates of two VMs with random kills, stalls and a full disk",
        description="Start a fresh emulated host and two VMs, and run N live updates; at a random moment of "
                    "each, kill the agent, a VMM or both, stall a step, or fill the disk (as root: the state dir "
                    "is then a tmpfs). Checks that every VM survives (its guest's counters go on, never a cold "
                    "boot), no update is left stuck and no DMA is damaged; an update may fail (rolled back). "
                    "Exit status 3 if any of that did not hold.")
    chaos.add_argument("--cycles", type=positive_int, default=50, help="live updates (default 50)")
    chaos.add_argument("--seed", type=int, help="the random seed (default: a new one, printed)")
    chaos.add_argument("--memory", type=guest_memory, default=64 << 20, metavar="SIZE",
                       help="each VM's RAM (default 64M)")
    json_arg(chaos, "{cycles, seed, actions, updates_ok, updates_failed, vms_lost, stuck_updates, dma_*, ...}", to_file=True)
    host_arg(chaos, BENCH_EMULATED_ONLY)
    chaos.set_defaults(func=_cmd_bench_chaos)
