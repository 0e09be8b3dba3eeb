"""`luvmm uapi`: the ioctl numbers and struct sizes luvmm speaks."""

from __future__ import annotations

import argparse

from luvmm import exitcodes
from luvmm.cli.common import json_arg, print_json


def _cmd_uapi(args: argparse.Namespace) -> int:
    from luvmm.uapi.table import format_table, uapi_values

    values = uapi_values()
    if args.json:
        print_json(values)
    else:
        print(format_table(values))
    return exitcodes.OK


def add_parser(sub) -> None:
    uapi = sub.add_parser(
        "uapi", help="print the kernel ioctl numbers and struct sizes luvmm uses",
        description="Print every ioctl number and uAPI struct size luvmm uses (KVM, VFIO cdev, "
                    "iommufd, LUO), computed with the kernel's _IOC macros and cffi layouts, "
                    "to compare with a kernel's headers.")
    json_arg(uapi, '{"IOCTL_NAME": number, "sizeof(struct NAME)": bytes, ...}')
    uapi.set_defaults(func=_cmd_uapi)
