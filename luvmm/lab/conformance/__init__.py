"""Conformance: the emulated kernel against the real one, case by case.

A *case* is a function of a :class:`Ctx` (a ``luvmm.host.Host``, the BDFs
of the PCI functions bound to vfio-pci that it may use, which side it runs
on) that does something to the kernel through the host interface and
returns what it saw -- an errno, a size, the flags of a retrieved file: any
JSON value.  The same cases run on the emulated host and, inside the lab
guest, on the real kernel (``python -m luvmm.lab.conformance``); ``luvmm
lab conformance`` runs both and compares them.  Where they differ the
emulated kernel is wrong -- unless the case is in :data:`OUT_OF_TREE`, the
one list of what mainline does not have (the VFIO and iommufd preservation
series, the provisional HWPT ioctl), where the difference is declared.

A case never depends on the device being a DSA or an edu: it asks the
kernel (region and IRQ info) for what it needs.  It closes what it opens
(:meth:`Ctx.track`), so that the next case starts from the same kernel.

The areas, one module each: ``luo`` (liveupdate.c, luo_session.c,
luo_file.c), ``memfd`` (memfd_luo.c), ``iommufd`` (drivers/iommu/iommufd),
``vfio`` (drivers/vfio: the cdev and vfio-pci).
"""

from __future__ import annotations

import importlib
import os
import traceback

AREAS = ("luo", "memfd", "iommufd", "vfio")


class Case:
    __slots__ = ("area", "name", "fn", "device")

    def __init__(self, area: str, name: str, fn, device: bool):
        self.area, self.name, self.fn, self.device = area, name, fn, device

    @property
    def key(self) -> str:
        return f"{self.area}.{self.name}"

    @property
    def doc(self) -> str:
        return " ".join((self.fn.__doc__ or "").split())


#: Every case, by ``area.name``, in the order the modules define them.
CASES: dict[str, Case] = {}

#: Cases whose results are allowed to differ, and why: what the emulated
#: host models that mainline does not have.  Nothing else may differ.
OUT_OF_TREE: dict[str, str] = {}

#: Cases the emulated host physically cannot reproduce, and why: a rule the
#: real kernel enforces on a file of the host's own kernel that the emulated
#: kernel only shares (a memfd the caller passed), where no userspace means
#: exists.  Declared like OUT_OF_TREE, shown as "not modelled".
CANNOT_MODEL: dict[str, str] = {}


def case(area: str, *, device: bool = False, out_of_tree: str | None = None,
         cannot_model: str | None = None):
    """Register a case of ``area``; ``device``: it needs a vfio-pci function;
    ``out_of_tree``: why its result may differ on a mainline kernel;
    ``cannot_model``: why the emulated host cannot give the real result."""
    def register(fn):
        c = Case(area, fn.__name__.removeprefix("case_"), fn, device)
        if c.key in CASES:
            raise ValueError(f"conformance case {c.key} defined twice")
        CASES[c.key] = c
        if out_of_tree:
            OUT_OF_TREE[c.key] = out_of_tree
        if cannot_model:
            CANNOT_MODEL[c.key] = cannot_model
        return fn
    return register


class Ctx:
    """What a case runs with."""

    def __init__(self, host, devices: list[str], side: str):
        self.host, self.devices, self.side = host, list(devices), side
        self._fds: list[int] = []

    @property
    def device(self) -> str:
        return self.devices[0]

    def track(self, fd: int) -> int:
        """An fd to close after the case (returned, for chaining)."""
        self._fds.append(fd)
        return fd

    def open(self, path: str, flags: int | None = None) -> int:
        return self.track(self.host.open(path) if flags is None else self.host.open(path, flags))

    def close_all(self) -> None:
        while self._fds:
            fd = self._fds.pop()
            try:
                self.host.close(fd)
            except OSError:
                pass


class LocalFds:
    """``with LocalFds() as local: fd = local(os.memfd_create(...))``: fds of
    this process (memfds, pipes) a case makes itself, closed at its end."""

    def __init__(self):
        self.fds: list[int] = []

    def __call__(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass


def errno_of(fn, *args, **kw) -> int:
    """0 if ``fn(*args)`` succeeds, else the errno it failed with."""
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno
    return 0


def load(areas=AREAS) -> list[Case]:
    for area in areas:
        if area not in AREAS:
            raise ValueError(f"no conformance area {area!r} (areas: {', '.join(AREAS)})")
        importlib.import_module(f"{__name__}.{area}")
    return [c for c in CASES.values() if c.area in areas]


def run(host, devices: list[str], side: str, areas=AREAS) -> dict[str, dict]:
    """Run the cases of ``areas``: {case: {"result": value} | {"skipped": why} | {"error": text}}."""
    out = {}
    for c in load(areas):
        if c.device and not devices:
            out[c.key] = {"skipped": "no PCI function bound to vfio-pci"}
            continue
        ctx = Ctx(host, devices, side)
        try:
            out[c.key] = {"result": c.fn(ctx)}
        except Exception as e:  # noqa: BLE001 - a case that breaks is a result to show, not a crash
            out[c.key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-1500:]}
        finally:
            ctx.close_all()
    return out


def compare(emulated: dict[str, dict], real: dict[str, dict]) -> list[dict]:
    """One row per case: both sides' outcomes, whether they agree, and the
    declared reason where they may not."""
    rows = []
    for key in list(CASES) + [k for k in emulated.keys() | real.keys() if k not in CASES]:
        if key not in emulated and key not in real:
            continue
        e, r = emulated.get(key, {"skipped": "not run"}), real.get(key, {"skipped": "not run"})
        same = "result" in e and "result" in r and e["result"] == r["result"]
        skipped = "skipped" in e or "skipped" in r
        rows.append({"case": key, "emulated": e, "real": r, "same": same, "skipped": skipped and not same,
                     "out_of_tree": OUT_OF_TREE.get(key) or CANNOT_MODEL.get(key),
                     "cannot_model": CANNOT_MODEL.get(key), "doc": CASES[key].doc if key in CASES else ""})
    return rows


def summary(rows: list[dict]) -> dict:
    differ = [r["case"] for r in rows if not r["same"] and not r["skipped"] and not r["out_of_tree"]]
    declared = [r for r in rows if not r["same"] and r["out_of_tree"]]
    return {"cases": len(rows), "same": sum(r["same"] for r in rows), "declared": len(declared),
            "out_of_tree": sum(not r.get("cannot_model") for r in declared),
            "not_modelled": sum(bool(r.get("cannot_model")) for r in declared),
            "skipped": sum(r["skipped"] and not r["out_of_tree"] for r in rows), "differ": differ}


def _outcome(side: dict) -> str:
    if "result" in side:
        return _short(side["result"])
    if "skipped" in side:
        return f"skipped ({side['skipped']})"
    return f"ERROR {side['error']}"


def _short(value) -> str:
    import errno as _errno

    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 200 and _errno.errorcode.get(value):
        return _errno.errorcode[value]
    if value == 0:
        return "0 (ok)"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_report(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        mark = "same" if r["same"] else ("not modelled" if r.get("cannot_model") else
                                         "out of tree" if r["out_of_tree"] else
                                         "skipped" if r["skipped"] else "DIFFERS")
        lines.append(f"{mark:12} {r['case']}: emulated {_outcome(r['emulated'])}; real {_outcome(r['real'])}")
        if not r["same"] and r["out_of_tree"]:
            lines.append(f"{'':12}   (declared: {r['out_of_tree']})")
    s = summary(rows)
    lines.append(f"{s['cases']} cases: {s['same']} the same on both, {s['out_of_tree']} declared out of tree, "
                 f"{s['not_modelled']} declared not modelled, "
                 f"{s['skipped']} skipped, {len(s['differ'])} differ"
                 + (f" ({', '.join(s['differ'])})" if s["differ"] else ""))
    return "\n".join(lines)
