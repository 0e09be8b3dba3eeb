"""`luvmm uapi`: the ioctl numbers and struct sizes luvmm uses, for comparison
with a kernel's headers (tests/unit/uapi/uapi_ref.c prints the same keys from C)."""

from __future__ import annotations

from luvmm.abi import IOCTLS, STRUCTS, ffi
from luvmm.uapi import load_all


def uapi_values() -> dict[str, int]:
    """``{IOCTL_NAME: number, "sizeof(struct NAME)": bytes}``, ioctls first."""
    load_all()
    values: dict[str, int] = {}
    for definition in sorted(IOCTLS.values(), key=lambda d: (d.name.split("_")[0], d.request)):
        values[definition.name] = definition.request
    for name in STRUCTS:
        values[f"sizeof({name})"] = ffi.sizeof(name)
    return values


def provisional() -> frozenset[str]:
    """Keys that model out-of-tree (not merged) uAPI."""
    from luvmm.uapi.iommufd import PROVISIONAL

    return frozenset(f"sizeof({n})" if n.startswith("struct ") else n for n in PROVISIONAL)


def format_table(values: dict[str, int]) -> str:
    marks = provisional()
    lines = [f"{'ioctl':<40} {'number':>10}  {'argument':<44} {'size':>5}"]
    for name, number in values.items():
        if name.startswith("sizeof("):
            continue
        argtype = IOCTLS[number].argtype
        note = "  (provisional)" if name in marks else ""
        lines.append(f"{name:<40} {number:>#10x}  {argtype or '(integer)':<44} "
                     f"{ffi.sizeof(argtype) if argtype else '':>5}{note}")
    lines.append("")
    lines.append(f"{'struct':<48} {'size':>5}  owner")
    for name, owner in STRUCTS.items():
        note = "  (provisional)" if f"sizeof({name})" in marks else ""
        lines.append(f"{name:<48} {ffi.sizeof(name):>5}  {owner}{note}")
    return "\n".join(lines)
