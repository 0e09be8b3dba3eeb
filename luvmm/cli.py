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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `luvmm uapi | head`
        sys.stderr.close()
        return 0
