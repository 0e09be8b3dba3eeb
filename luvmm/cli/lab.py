"""``luvmm lab build | run | kexec``: registered on the main parser by :func:`add_parser`."""

from __future__ import annotations

import argparse
import json
import sys


def _fail(text: str) -> int:
    print(f"luvmm lab: {text}", file=sys.stderr)
    return 1


def _no_kernel(kernel: str | None) -> int:
    if kernel:
        return _fail(f"no lab kernel {kernel!r} (a build directory or key of `luvmm lab build`)")
    return _fail("no lab kernel: run `luvmm lab build`")


def _cmd_build(args: argparse.Namespace) -> int:
    from luvmm.lab import LabError
    from luvmm.lab.build import build, describe

    try:
        manifest = build(args.kernel_src, args.config, jobs=args.jobs)
    except LabError as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except KeyboardInterrupt:
        return _fail("interrupted (the next `luvmm lab build` goes on from where this one stopped)")
    print(describe(manifest))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from luvmm.lab import LabError
    from luvmm.lab.build import find
    from luvmm.lab.run import run

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        return _fail("no command: luvmm lab run [options] -- CMD [ARG...]")
    manifest = find(args.kernel)
    if manifest is None:
        return _no_kernel(args.kernel)
    try:
        result = run(cmd, manifest, devices=args.edu, memory=args.memory, cpus=args.cpus, timeout=args.timeout,
                     results=args.results, accel=args.accel, console=args.console,
                     kexec_image=args.kexec_kernel, append=args.append, tee=not args.json)
    except LabError as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except KeyboardInterrupt:
        return _fail("interrupted (QEMU stopped)")
    if args.json:  # the summary on stdout instead of CMD's output (which it holds)
        json.dump(result.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    if result.timed_out:
        _fail(f"timed out after {args.timeout:g} s in stage {result.stages} (QEMU stopped)")
        return 124
    if result.stages == 0:
        tail = result.stderr.strip().splitlines()[-3:]
        _fail("the lab guest never ran the command" + (f": {' | '.join(tail)}" if tail else ""))
        return 125
    if not any(e.get("stage") == result.stages for e in result.exits):
        _fail(f"stage {result.stages} ended without the command's exit status: the guest kernel stopped "
              f"(virtme-ng's status {result.status}; --console shows why)")
        return 125
    trips = ", ".join(f"{t:.1f} s" for t in result.kexec_round_trips())
    print(f"luvmm lab: {result.stages} stage(s) in {result.seconds:.1f} s ({result.accel}; boot "
          f"{result.boot_seconds() or 0:.1f} s{'; kexec round trip ' + trips if trips else ''}); exit status "
          f"{result.status}", file=sys.stderr)
    return result.status if result.status is not None else 1


def _cmd_conformance(args: argparse.Namespace) -> int:
    from luvmm.lab import LabError, conformance
    from luvmm.lab.build import find
    from luvmm.tools.conformance import run_both

    areas = tuple(args.area) or conformance.AREAS
    manifest = find(args.kernel)
    if manifest is None:
        return _no_kernel(args.kernel)
    try:
        report = run_both(areas, manifest, args.timeout)
    except LabError as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except KeyboardInterrupt:
        return _fail("interrupted (QEMU stopped, the emulated host stopped)")
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"lab kernel {report['kernel']} against the emulated host:")
        print(conformance.format_report(report["cases"]))
    differ = report["summary"]["differ"]
    if differ:
        return _fail(f"{len(differ)} case(s) differ from the real kernel: {', '.join(differ)}")
    return 0


def _cmd_kexec(args: argparse.Namespace) -> int:
    from luvmm.lab import guest

    try:
        guest.kexec(args.image)
    except guest.NotInLab as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(str(e))
    return 1  # not reached: the guest reboots


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``luvmm lab`` and its commands on the main parser's subparsers."""
    from luvmm.lab import DEFAULT_CPUS, DEFAULT_MEMORY, DEFAULT_TIMEOUT

    lab = subparsers.add_parser(
        "lab", help="a real LUO kernel under QEMU: build it, run commands and staged tests in it",
        description="The lab: a real Live Update Orchestrator kernel (Debian's linux-source-7.*, or your "
                    "tree) booted under QEMU with virtme-ng -- the host's filesystem as its root, q35 with an "
                    "intel-iommu, QEMU's edu PCI devices bound to vfio-pci, nested KVM. A kexec in the guest "
                    "boots the next stage and the command runs again.")
    sub = lab.add_subparsers(dest="lab_command", metavar="ACTION")
    sub.required = True

    b = sub.add_parser(
        "build", help="build (or find cached) the lab kernel, its uAPI headers and the LUO selftests",
        description="Build the lab kernel: Debian's newest linux-source-7.* from sid (fetched with apt through "
                    "a private sources list; the system's apt set-up is not touched) or --kernel-src DIR, "
                    "configured with luvmm/lab/config/lab.config over virtme-ng's minimal config, compiled at "
                    "nice 19; also installs its uAPI headers and builds the upstream LUO selftests. Cached in "
                    "$LUVMM_LAB_CACHE or ~/.cache/luvmm/lab, keyed by source version and config.")
    b.add_argument("--kernel-src", metavar="DIR",
                   help="your own kernel tree (e.g. with the VFIO/iommufd live-update series); it must be clean "
                        "(the build is out of tree) and is rebuilt incrementally each time")
    b.add_argument("--config", metavar="FRAGMENT", action="append", default=[],
                   help="a config fragment over the lab's (repeatable); each of its lines must hold in the "
                        "final .config")
    b.add_argument("--jobs", "-j", type=int, metavar="N", help="parallel compile jobs (default: every CPU)")
    b.set_defaults(func=_cmd_build)

    r = sub.add_parser(
        "run", help="boot the lab kernel and run CMD in it (again after each kexec); its exit status is ours",
        description="Boot the lab kernel under QEMU (KVM where /dev/kvm has hardware virtualization, else "
                    "TCG) and run CMD as root in the guest, in the current directory. CMD sees LUVMM_LAB_STAGE "
                    "(1, then 2 after a kexec...), LUVMM_LAB_SHARED (a directory the host sees), "
                    "LUVMM_LAB_DEVICES (the edu BDFs, bound to vfio-pci), LUVMM_LAB_KERNEL and "
                    "LUVMM_LAB_SELFTESTS. `luvmm lab kexec` in CMD reboots into the next stage. Prints CMD's "
                    "output and exits with the last stage's exit status (124 on timeout).")
    r.add_argument("--kernel", metavar="BUILD", help="a lab kernel build directory or key (default: the last built)")
    r.add_argument("--kexec-kernel", metavar="IMAGE", help="the kernel a kexec in the guest boots (default: the same)")
    r.add_argument("--edu", type=int, default=1, metavar="N", help="QEMU edu devices to pass through (default 1)")
    r.add_argument("--memory", default=DEFAULT_MEMORY, metavar="SIZE", help=f"guest RAM (default {DEFAULT_MEMORY})")
    r.add_argument("--cpus", type=int, default=DEFAULT_CPUS, metavar="N", help=f"guest CPUs (default {DEFAULT_CPUS})")
    r.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"stop QEMU after this long, all stages together (default {DEFAULT_TIMEOUT:g})")
    r.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="QEMU accelerator; auto (default): kvm if /dev/kvm has hardware virtualization, else tcg")
    r.add_argument("--results", metavar="DIR",
                   help="the shared directory, kept afterwards: boots.jsonl, exits.jsonl, kexec.jsonl, "
                        "dmesg-N.txt and whatever CMD writes (default: a temporary one, removed)")
    r.add_argument("--append", action="append", default=[], metavar="ARG", help="an extra kernel command-line argument")
    r.add_argument("--console", action="store_true", help="show the guest kernel's console on stderr")
    r.add_argument("--json", action="store_true",
                   help="print the run's summary (stages, exit statuses, timings, CMD's output) as one JSON "
                        "document on stdout instead of CMD's output")
    r.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="the command to run in the guest")
    r.set_defaults(func=_cmd_run)

    c = sub.add_parser(
        "conformance", help="the same cases on the emulated host and on the lab kernel, compared",
        description="Run the conformance cases (luvmm/lab/conformance: LUO, memfd preservation, iommufd, the "
                    "VFIO cdev) on a fresh emulated host and on the lab kernel under QEMU (one edu bound to "
                    "vfio-pci), and print each case's result on both sides. Exit status 1 if any case differs "
                    "that is not declared out of tree (what mainline does not have: VFIO and iommufd "
                    "preservation, the provisional HWPT ioctl).")
    c.add_argument("--area", action="append", default=[], choices=("luo", "memfd", "iommufd", "vfio"),
                   help="only this area's cases (repeatable; default: all)")
    c.add_argument("--kernel", metavar="BUILD", help="a lab kernel build directory or key (default: the last built)")
    c.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"stop QEMU after this long (default {DEFAULT_TIMEOUT:g})")
    c.add_argument("--json", action="store_true",
                   help="print {kernel, summary: {cases, same, declared, skipped, differ}, cases: [...]} as one "
                        "JSON document on stdout instead of text")
    c.set_defaults(func=_cmd_conformance)

    k = sub.add_parser(
        "kexec", help="inside the lab guest: kexec into the next stage (LUO preserves what is in its sessions)",
        description="Inside a `luvmm lab run` guest: load the lab kernel with kexec_file_load (as kexec -s -l IMAGE --reuse-cmdline) "
                    "and reboot(LINUX_REBOOT_CMD_KEXEC) into it; the command then runs again as the next stage.")
    k.add_argument("image", nargs="?", help="the kernel to boot (default: $LUVMM_LAB_KERNEL)")
    k.set_defaults(func=_cmd_kexec)
    return lab
