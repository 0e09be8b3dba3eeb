"""`luvmm update`: live-update the host, and abandon an update that will not end by itself."""

from __future__ import annotations

import argparse

from luvmm import exitcodes
from luvmm.cli.common import (
    report_updates,
    CliError,
    check_json_file,
    emit,
    json_arg,
    positive_int,
    progress,
    running_host,
    positive_seconds,
    state_dir_arg,
)


def _cmd_update(args: argparse.Namespace) -> int:
    from liveupdate.agent_client import AgentError
    from liveupdate.update import cycle_line, summarize, update_once

    check_json_file(args.json)
    state = running_host(args)
    if args.abandon:
        return _abandon(state, args.json)
    if not state.vm_names():
        raise CliError(f"no VM runs on the host in {state.path}: nothing to update (`luvmm vm start NAME`)")
    show = progress()
    records, failed, interrupted = [], [], None
    try:
        for n in range(1, args.cycles + 1):
            try:
                records.append(update_once(state, timeout=args.timeout))
            except AgentError as e:
                failed.append(f"update {n}/{args.cycles} failed: {e.strerror or e}")
                break
            if show:
                show(cycle_line(n, args.cycles, records[-1]))
    except KeyboardInterrupt:
        interrupted = (f"interrupted after {len(records)} of {args.cycles} update(s); one under way is finished or "
                       "rolled back by the host (`luvmm vm status` shows the VMs)")
    summary = summarize(records)
    summary["failed_updates"] = failed
    return report_updates(summary, args.json, interrupted)


def _abandon(state, as_json) -> int:
    """`luvmm update --abandon`: fail the update under way that will not end by itself."""
    from liveupdate.agent_client import wait_for_agent

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
    update = sub.add_parser("update", help="live-update the host: prepare every VM, kexec, collect reports",
                            description="Ask the LUO agent for live updates: every VM's VMM prepares (pause, "
                                        "save, preserve), the host kexecs, the VMMs restore and report. Exit "
                                        "status: 0 DMA intact, 1 an update failed (rolled back), 3 DMA damaged, "
                                        "4 the device was reset.")
    state_dir_arg(update)
    update.add_argument("--cycles", type=positive_int, default=1, help="updates in a row (default 1)")
    update.add_argument("--timeout", type=positive_seconds, default=60.0, help="seconds to wait for each step (default 60)")
    update.add_argument("--abandon", action="store_true",
                        help="fail the update under way instead (one whose restored VMs never all reported): "
                             "the VMs are left as they are, the next update can start")
    json_arg(update, '{"cycles": [...], "blackout_s": {"p50", "p99", "max"}, ...}', to_file=True)
    update.set_defaults(func=_cmd_update)
