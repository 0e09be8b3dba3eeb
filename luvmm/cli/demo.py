"""`luvmm demo`: the whole story on an emulated host of its own."""

from __future__ import annotations

import argparse
import os

from luvmm import exitcodes
from luvmm.cli.common import (CliError, guest_arg, guest_cpus_arg, host_arg, listen_address, memory_args, pick_guest,
                               positive_int, profile_arg, say)


def _cmd_demo(args: argparse.Namespace) -> int:
    from luvmm.tools.demo import run_demo
    from luvmm.liveupdate.update import outcome
    from luvmm.metrics.report import verdict

    guest = pick_guest(args.guest)
    from luvmm.outfiles import UnsafeOutput, check_dir
    from luvmm.tools.bench import guest_cpus_for

    try:  # before the run, not after it: the report is what it is for
        check_dir(args.report)
    except UnsafeOutput as e:
        raise CliError(f"--report {args.report}: {e}", exitcodes.USAGE) from None

    result = run_demo(cycles=args.cycles, profile=args.kernel_profile, report_dir=args.report,
                      memory=args.memory, guest_kind=guest, metrics_port=args.metrics_port, keep=args.keep,
                      state_dir=args.state_dir, overcommit=args.overcommit,
                      guest_cpus=guest_cpus_for(args.guest_cpus, 1))
    summary = result["summary"]
    _, vtext = verdict(summary, {"kernel_profile": args.kernel_profile})
    print()
    print(vtext)
    if result.get("report"):
        print(f"Report: file://{os.path.abspath(result['report'])}")
    if args.keep:
        print(f"The host and the VM still run: luvmm host stop --state-dir {result['state_dir']}")
    if result.get("interrupted"):
        say(f"interrupted after {len(summary['updates'])} of {args.cycles} update(s)")
        return exitcodes.INTERRUPTED
    return outcome(summary)[0]


def add_parser(sub) -> None:
    demo = sub.add_parser(
        "demo", help="start here: a VM with a passed-through DSA, live updates, a report",
        description="On an emulated host of its own: start a VM whose guest drives a passed-through DSA, "
                    "live-update the host while DMA runs (a live view shows throughput and each blackout "
                    "with its phases), and write a report with plots (DIR/index.html, PNGs beside it). "
                    "Exit status 0 when DMA went on through every update, 4 when the kernel profile reset "
                    "the device (the reset-on-freeze finding), 3 when DMA was damaged, 1 when an update failed.")
    demo.add_argument("--cycles", type=positive_int, default=5, help="live updates (default 5)")
    profile_arg(demo)
    demo.add_argument("--report", metavar="DIR", default="luvmm-report", help="where to write the report "
                                                                               "(default ./luvmm-report)")
    memory_args(demo)
    guest_arg(demo)
    demo.add_argument("--metrics-port", metavar="[ADDRESS:]PORT", type=listen_address,
                      help="serve Prometheus metrics: the host's on PORT, the VM's on PORT+1")
    guest_cpus_arg(demo, "auto")
    demo.add_argument("--keep", action="store_true", help="leave the host and the VM running afterwards")
    demo.add_argument("--state-dir", metavar="DIR", help="the demo host's state dir (default: a new one in /tmp, "
                                                         "removed afterwards)")
    host_arg(demo, "`luvmm demo` runs on an emulated host of its own only")
    demo.set_defaults(func=_cmd_demo)
