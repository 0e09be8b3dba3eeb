"""`luvmm update`: live-update the host (the emulated one, or this machine into a new kernel), show the last
update's report, and abandon an update that will not end by itself."""

from __future__ import annotations

import argparse
import errno
import sys

from luvmm import exitcodes
from luvmm.cli.common import (
    report_updates,
    CliError,
    check_host,
    check_json_file,
    emit,
    host_arg,
    is_real,
    json_arg,
    positive_int,
    progress,
    running_host,
    positive_seconds,
    state_dir_arg,
)

#: The options of an update itself, which --last and --abandon do not take.
_UPDATE_OPTIONS = (("kernel", "--kernel"), ("initrd", "--initrd"), ("append", "--append"),
                   ("reuse_cmdline", "--reuse-cmdline"), ("require_dma_continuity", "--require-dma-continuity"),
                   ("cycles", "--cycles"))


def _check_options(args: argparse.Namespace) -> None:
    """The combinations argparse cannot say are wrong: one line, exit status 2."""
    mode = "--last" if args.last else "--abandon" if args.abandon else None
    given = [flag for dest, flag in _UPDATE_OPTIONS if getattr(args, dest) not in (None, False)]
    if mode:
        if given:
            raise CliError(f"{given[0]}: not with {mode}", exitcodes.USAGE)
        return
    kernel = [flag for flag in given if flag in ("--kernel", "--initrd", "--append", "--reuse-cmdline")]
    if not is_real(args):
        if kernel:
            raise CliError(f"{kernel[0]}: the emulated host kexecs into its own emulated kernel; a kernel image "
                           "is for --host real", exitcodes.USAGE)
        return
    if args.kernel is None:
        raise CliError("--host real: which kernel to boot? --kernel IMAGE (with --initrd FILE, and --append ARGS "
                       "or --reuse-cmdline)", exitcodes.USAGE)
    if (args.cycles or 1) > 1:
        raise CliError(f"--cycles {args.cycles}: one update per run on a real host (this command does not outlive "
                       "its kexec: run it again on the new kernel)", exitcodes.USAGE)


def _cmd_update(args: argparse.Namespace) -> int:
    from luvmm.liveupdate.agent_client import AgentError
    from luvmm.liveupdate.update import cycle_line, summarize, update_once

    check_json_file(args.json)
    _check_options(args)
    state = running_host(args)
    if args.last:
        return _last(state, args.json, args.timeout)
    if args.abandon:
        return _abandon(state, args.json)
    if not state.vm_names():
        raise CliError(f"no VM runs on the host in {state.path}: nothing to update (`luvmm vm start NAME`)")
    if args.require_dma_continuity:
        _require_dma_continuity(args, state)
    if is_real(args):
        return _update_real(args, state)
    cycles = args.cycles or 1
    show = progress()
    records, failed, interrupted = [], [], None
    try:
        for n in range(1, cycles + 1):
            try:
                records.append(update_once(state, timeout=args.timeout))
            except AgentError as e:
                if e.errno == errno.EBUSY and not records:  # refused up front: another one runs, nothing paused
                    raise CliError(e.strerror or str(e)) from None
                failed.append(f"update {n}/{cycles} failed: {e.strerror or e}")
                break
            if show:
                show(cycle_line(n, cycles, records[-1]))
    except KeyboardInterrupt:
        interrupted = (f"interrupted after {len(records)} of {cycles} update(s); one under way is finished or "
                       "rolled back by the host (`luvmm vm status` shows the VMs)")
    summary = summarize(records)
    summary["failed_updates"] = failed
    return report_updates(summary, args.json, interrupted)


def _update_real(args: argparse.Namespace, state) -> int:
    """This machine into ``--kernel``: load it (every reason it cannot boot
    shows here, before a VM is paused), then the agent prepares the VMs and
    kexecs -- this process ends with the old kernel.  An update the agent
    rolled back unloads the kernel again."""
    from luvmm.liveupdate.agent_client import AgentError
    from luvmm.liveupdate.kexec import load_kernel, unload_kernel
    from luvmm.liveupdate.update import summarize, update_once

    try:
        load_kernel(args.kernel, initrd=args.initrd, cmdline=args.append, reuse_cmdline=args.append is None)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise CliError(f"{e.strerror or e}{where}; no VM was paused") from None
    out = sys.stderr if args.json in (True, "-") else sys.stdout
    accepted = False

    def rebooting(started: dict) -> None:
        nonlocal accepted
        accepted = True
        print(f"update {started['update']}: {len(started['vms'])} VM(s) prepared, rebooting into {args.kernel} "
              "(`luvmm update --last` shows the report there)", file=out, flush=True)

    sys.stdout.flush()
    sys.stderr.flush()  # nothing of this process's output may be lost in the kexec
    failed, records = [], []
    try:
        records.append(update_once(state, timeout=args.timeout, on_started=rebooting))
    except AgentError as e:  # refused, or the kexec failed: the agent resumed every VM
        failed.append(f"update failed: {e.strerror or e}")
    except BaseException:
        if not accepted:  # the agent never took it: nothing will boot the kernel loaded for it
            _unload(unload_kernel)
        raise
    if failed:
        _unload(unload_kernel)
    summary = summarize(records)
    summary["failed_updates"] = failed
    return report_updates(summary, args.json)


def _unload(unload_kernel) -> None:
    try:
        unload_kernel()
    except OSError:
        pass  # nothing to boot it anyway: the update is over


#: What `luvmm host check` must find for an update to keep every device's DMA going, in its order.
_DMA_FINDINGS = ("liveupdate", "memfd", "kho", "kexec_file_load", "vfio", "iommufd", "hwpt", "device",
                 "dma_continuity")
_MUST_BE_KNOWN = ("vfio", "iommufd", "hwpt", "device")


def _require_dma_continuity(args: argparse.Namespace, state) -> None:
    """--require-dma-continuity: refuse before anything is paused or loaded
    unless the kernel keeps every VM's device and its DMA through the kexec
    (what `luvmm host check --device BDF` says, the preservation probed by
    the agent: VFIO cdev, iommufd, HWPT)."""
    for device in _vm_devices(state):
        result = check_host(args, device)
        if result["dma_continuity"]:
            continue
        found = {f["name"]: f for f in result["findings"]}
        bad = next((found[n] for n in _DMA_FINDINGS if n in found and (
            found[n]["present"] is False or found[n]["present"] is None and n in _MUST_BE_KNOWN)), None)
        why = f"{bad['detail']}: {bad['consequence']}" if bad else "the kernel does not keep the device's DMA"
        what = result.get("device") or "the device"
        raise CliError(f"--require-dma-continuity: no DMA continuity for {what} ({why}); nothing was paused "
                       f"(`luvmm host check{f' --device {what}' if result.get('device') else ''}` says more)")


def _vm_devices(state) -> list:
    """The devices of the host's VMs (their VMMs say; else their configs), None where not known."""
    import json

    from luvmm.vmm import manage

    devices = []
    for name in state.vm_names():
        try:
            device = manage.status(state, name)["bdf"]
        except (OSError, ValueError, KeyError, manage.VmError):
            try:
                device = json.loads(state.read_file(f"vms/{name}/config.json"))["device"]
            except (OSError, ValueError, KeyError, TypeError):
                device = None
            device = None if device == "auto" else device
        if device not in devices:
            devices.append(device)
    return devices


def _last(state, as_json, timeout: float) -> int:
    """`luvmm update --last`: the report of the host's last update, as `luvmm update` gave it."""
    from luvmm.liveupdate.update import summarize

    record = _last_record(state, timeout)
    if record is None:
        raise CliError(f"no update was ever made on this host (state dir {state.path})")
    phase = record.get("phase")
    if phase in ("kexec", "rolling-back", "restoring"):
        raise CliError(f"update {record.get('id')} is still under way (phase {phase}); `luvmm update --last` "
                       "again once its VMs have reported, or `luvmm update --abandon`")
    if phase == "failed":
        summary = summarize([])
        summary["failed_updates"] = [f"update {record.get('id')} failed: {record.get('error') or 'update failed'}"]
    else:
        summary = summarize([record])
        summary["failed_updates"] = []
    summary["updates"] = [record]
    return report_updates(summary, as_json)


def _last_record(state, timeout: float) -> dict | None:
    """The agent's record of the last update: asked of the agent (which
    waits while an update is restoring), else read from its file."""
    import json
    import os

    from luvmm.liveupdate.agent_client import AgentClient

    try:
        client = AgentClient(state)
    except OSError:
        client = None
    if client is not None:
        try:
            return client.call({"op": "result", "timeout": timeout})[0]
        except OSError:
            pass  # an agent going away: its record is on disk
        finally:
            client.close()
    path = os.path.join(state.path, "agent", "update.json")
    try:
        data = state.read_file("agent/update.json")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        record = json.loads(data)
    except ValueError:
        raise CliError(f"{path}: not an update record") from None
    if not isinstance(record, dict):
        raise CliError(f"{path}: not an update record")
    return record


def _abandon(state, as_json) -> int:
    """`luvmm update --abandon`: fail the update under way that will not end by itself."""
    from luvmm.liveupdate.agent_client import wait_for_agent

    client, _ = wait_for_agent(state, 30)
    try:
        update = client.call({"op": "abandon"})[0]
    finally:
        client.close()
    emit(update, as_json, lambda: _format_abandoned(update))
    return exitcodes.OK


def _format_abandoned(update) -> str:
    if update is None:
        return "no update was ever made on this host"
    errors = [r["error"] for r in update.get("reports", {}).values() if r.get("error")]
    return f"update {update['id']}: {update['phase']}" + (f" ({'; '.join(errors)})" if errors else "")


def add_parser(sub) -> None:
    update = sub.add_parser(
        "update", help="live-update the host: prepare every VM, kexec, collect reports; or the last update's report",
        description="Ask the LUO agent for live updates: every VM's VMM prepares (pause, save, preserve), the "
                    "host kexecs, the VMMs restore and report: each VM's blackout, the guest time lost after it "
                    "(guest_lost_s) and the time until the guest was back at pace (guest_recovery_s), its DMA. "
                    "On a real host (--host real) the new kernel is "
                    "--kernel IMAGE, loaded before any VM is paused; this command ends with the old kernel, and "
                    "`luvmm update --last` on the new one shows the report. Exit status: 0 DMA intact, 1 an "
                    "update failed (rolled back) or left a VM without its metrics endpoint (its VMM could not "
                    "serve the port: the table says why), 3 DMA damaged, 4 the device was reset.")
    host_arg(update)
    state_dir_arg(update)
    update.add_argument("--kernel", metavar="IMAGE",
                        help="--host real: the kernel to boot (kexec_file_load; required there)")
    update.add_argument("--initrd", metavar="FILE", help="--host real: its initrd (default: none)")
    cmdline = update.add_mutually_exclusive_group()
    cmdline.add_argument("--append", metavar="ARGS",
                         help="--host real: the new kernel's command line (default: --reuse-cmdline)")
    cmdline.add_argument("--reuse-cmdline", action="store_true",
                         help="--host real: boot it with this boot's command line (the default)")
    update.add_argument("--require-dma-continuity", action="store_true",
                        help="refuse the update, before any VM is paused, unless the kernel keeps every VM's "
                             "device and its DMA through the kexec (VFIO cdev, iommufd and HWPT preservation: "
                             "what `luvmm host check` finds)")
    update.add_argument("--cycles", type=positive_int, help="updates in a row (default 1; a real host: 1)")
    update.add_argument("--timeout", type=positive_seconds, default=60.0,
                        help="seconds to wait for each step before the kexec (default 60); once the kexec has "
                             "started, its outcome is waited for at least 30 s")
    mode = update.add_mutually_exclusive_group()
    mode.add_argument("--last", action="store_true",
                      help="print the report of the host's last update instead (waiting while it restores), "
                           "with the exit status it had")
    mode.add_argument("--abandon", action="store_true",
                      help="fail the update under way instead (one whose restored VMs never all reported): "
                           "the VMs are left as they are, the next update can start")
    json_arg(update, '{"cycles": [...], "blackout_s": {"p50", "p99", "max"}, "guest_lost_s": {...}, '
                     '"guest_recovery_s": {...}, ...}', to_file=True)
    update.set_defaults(func=_cmd_update)
