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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `luvmm uapi | head`
        sys.stderr.close()
        return 0
