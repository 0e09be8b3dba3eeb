"""`luvmm host`: the emulated host -- start, stop, status, faults, kexec; what a kernel offers a
live update (check); a real host's systemd units (install)."""

from __future__ import annotations

import argparse

from luvmm import exitcodes
from luvmm.cli.common import (
    DEFAULT_DSA_BANDWIDTH,
    PROFILES,
    CliError,
    Connection,
    Parser,
    bandwidth_arg,
    guest_cpus_arg,
    check_host,
    device_count,
    host_arg,
    json_arg,
    metrics_port_arg,
    metrics_url,
    print_json,
    profile_arg,
    running_host,
    say,
    state_dir_arg,
    state_of,
)


def _cmd_host_start(args: argparse.Namespace) -> int:
    from luvmm.liveupdate.emu import hostctl

    state = state_of(args)
    if hostctl.running(state):
        raise CliError(f"an emulated host is already running in {state.path}")
    gone = hostctl.dead(state)
    if gone is not None:
        stopped = hostctl.bury(state)
        say(f"the emulated host that ran in {state.path} had died{f' (pid {gone})' if gone > 0 else ''}: "
            f"stopped what was left of it ({len(stopped)} process(es)); starting a new one")
    earlier = state.vm_names() if state.exists() else []
    given = {"devices": args.devices, "profile": args.kernel_profile, "dsa_bandwidth": args.dsa_bandwidth,
             "metrics_port": args.metrics_port, "guest_cpus": args.guest_cpus}
    # The host that ran here and kept its VMs: what was not said now is as it was then.
    saved = hostctl.saved_options(state) if earlier else {}
    reused = {k: v for k, v in saved.items() if k in given and given[k] is None and v is not None}
    options = {"devices": 1, "profile": PROFILES[0], "dsa_bandwidth": DEFAULT_DSA_BANDWIDTH,
               **{k: v for k, v in given.items() if v is not None}, **reused}
    pid = hostctl.start(state, devices=options["devices"], profile=options["profile"],
                        dsa_bandwidth=options["dsa_bandwidth"] or None, agent=not args.no_agent,
                        metrics_port=options.get("metrics_port"), guest_cpus=options.get("guest_cpus"))
    print(f"emulated host running in {state.path} (pid {pid}, {options['devices']} DSA, kernel profile "
          f"{options['profile']}); control socket {state.socket}")
    flags = {"devices": "--devices", "profile": "--kernel-profile", "dsa_bandwidth": "--dsa-bandwidth",
             "metrics_port": "--metrics-port", "guest_cpus": "--guest-cpus"}
    said = {k: v for k, v in reused.items() if v != {"devices": 1, "profile": PROFILES[0],
                                                     "dsa_bandwidth": DEFAULT_DSA_BANDWIDTH}.get(k)}
    if said:
        print("with the options of the host that ran there before: "
              + " ".join(f"{flags[k]} {v}" for k, v in said.items()))
    if earlier:
        print(f"booting {len(earlier)} VM(s) defined there by an earlier run, cold (their RAM did not outlive "
              f"that host): {', '.join(earlier)}")
    if options.get("metrics_port") is not None:
        print(f"Prometheus metrics on http://{metrics_url(options['metrics_port'])}/metrics")
    return exitcodes.OK


def _cmd_host_stop(args: argparse.Namespace) -> int:
    from luvmm.liveupdate.emu import hostctl

    state = state_of(args)
    gone = hostctl.dead(state)
    if gone is not None:  # killed (SIGKILL, a crash): what is left of it goes, as its stop would have removed it
        stopped = hostctl.bury(state)
        kept = state.vm_names() if state.exists() else []
        print(f"no emulated host was running in {state.path}: it had died{f' (pid {gone})' if gone > 0 else ''}; "
              f"stopped what was left of it ({len(stopped)} process(es)) and removed its files")
    else:
        kept = hostctl.stop(state)
        if kept is None:
            say(f"no emulated host is running in {state.path}")
            return exitcodes.OK  # already stopped: what was asked holds (as `systemctl stop`)
        print(f"stopped the emulated host in {state.path}")
    if kept:
        print(f"kept the definitions of VM(s) {', '.join(kept)} there: `luvmm host start` boots them again, "
              "`luvmm vm stop NAME` removes one")
    return exitcodes.OK


def _cmd_host_status(args: argparse.Namespace) -> int:
    from luvmm.liveupdate.emu.hostctl import format_status

    with Connection(running_host(args)) as host:
        status = host.call({"op": "status"})[0]
    print_json(status) if args.json else print(format_status(status))
    return exitcodes.OK


def _cmd_host_check(args: argparse.Namespace) -> int:
    from luvmm.devices.vfio import is_bdf
    from luvmm.liveupdate.check import format_check

    if args.device is not None and not is_bdf(args.device):
        raise CliError(f"--device {args.device}: not a PCI address (DDDD:BB:DD.F, as lspci -D prints it)",
                       exitcodes.USAGE)
    result = check_host(args, args.device)
    print_json(result) if args.json else print(format_check(result))
    if result["dma_continuity"]:
        return exitcodes.OK
    return exitcodes.DEVICE_RESET if result["vm_survives"] else exitcodes.FAILED


def _cmd_host_faults(args: argparse.Namespace) -> int:
    with Connection(running_host(args)) as host:
        request = {"op": "faults", "clear": args.clear}
        if args.spec:
            request["set"] = ",".join(args.spec)
        try:
            rules = host.call(request)[0]
        except OSError as e:
            raise CliError(e.strerror or str(e), exitcodes.USAGE) from None
    if args.json:
        print_json(rules)
    else:
        print("\n".join(rules) if rules else "no faults injected")
    return exitcodes.OK


def _cmd_host_kexec(args: argparse.Namespace) -> int:
    state = running_host(args)
    with Connection(state) as host:
        running = [u["name"][3:] for u in host.call({"op": "units"})[0] if u["name"].startswith("vm-") and u["running"]]
        if running and not args.force:
            raise CliError(f"VM(s) {', '.join(running)} run on this host: a bare kexec saves no machine state, so "
                           "they would be lost. Live-update them with `luvmm update`, or kexec anyway with --force")
        if running:
            say(f"kexec --force: VM(s) {', '.join(running)} were not prepared; their VMMs find no saved machine "
                "state after the reboot and the VMs are lost")
        try:
            info = host.kexec()
        except OSError as e:
            raise CliError(f"kexec failed: {e.strerror} (errno {e.errno}); the old kernel is still running") from None
    if args.json:
        print_json(info)
    else:
        print(f"kexec done: generation {info['generation']}, {info['seconds'] * 1000:.1f} ms, KHO image "
              f"{info['kho_bytes']} bytes")
    if info.get("kho_error"):
        raise CliError(f"the new kernel refused the KHO image: {info['kho_error']}")
    return exitcodes.OK


def _cmd_host_install(args: argparse.Namespace) -> int:
    import os
    import shutil
    import subprocess

    from luvmm.wiring import systemd

    version = args.systemd_version or systemd.systemd_version()
    files = systemd.unit_files(version, guest_cpus=args.guest_cpus)
    target = os.path.join(args.root, systemd.UNIT_DIR)
    if args.dry_run:
        for name, text in files.items():
            print(f"# {os.path.join(target, name)}")
            print(text)
        return exitcodes.OK
    if not os.path.isdir(args.root):
        raise CliError(f"--root {args.root}: not a directory")
    try:
        written = systemd.install(files, args.root)
    except OSError as e:
        raise CliError(f"cannot write the units to {target}: {e.strerror or e}; nothing was written") from None
    for path in written:
        print(f"wrote {path}")
    print(f"for {f'systemd {version}' if version else 'a current systemd'}: {', '.join(files)}; "
          f"state in {systemd.STATE_DIR}")
    grafana = _install_grafana_provider(args.root)
    if grafana:
        print(f"wrote {grafana} (Grafana's luvmm dashboard)")
    if os.path.realpath(args.root) != "/":
        return exitcodes.OK
    if shutil.which("systemctl"):
        done = subprocess.run(["systemctl", "daemon-reload"], capture_output=True, text=True)
        if done.returncode:
            cause = (done.stderr or done.stdout).strip().splitlines()
            raise CliError(f"wrote the units, but systemctl daemon-reload failed: "
                           f"{cause[0] if cause else f'exit status {done.returncode}'}")
        print("systemctl daemon-reload: done")
    print(f"start the agent, and with it at every boot: systemctl enable --now {systemd.AGENT_UNIT}")
    return exitcodes.OK


#: Where Grafana looks for dashboard providers (its packages make it).
GRAFANA_DASHBOARDS = "etc/grafana/provisioning/dashboards"


def _install_grafana_provider(root: str) -> str | None:
    """Where Grafana is installed (its provisioning directory exists under
    ROOT): a dashboard provider for luvmm's dashboard, its path the
    installed package's own metrics/grafana -- not a copy that could go
    stale.  Returns the file written, None where there is no Grafana."""
    import os

    from luvmm import metrics

    target = os.path.join(root, GRAFANA_DASHBOARDS)
    if not os.path.isdir(target):
        return None
    source = os.path.join(os.path.dirname(metrics.__file__), "grafana")
    with open(os.path.join(source, "provisioning", "dashboards", "luvmm.yaml")) as f:
        text = f.read()
    text = text.replace("path: METRICS_GRAFANA_DIR", f"path: {source}")
    path = os.path.join(target, "luvmm.yaml")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "x") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CliError(f"wrote the units, but not Grafana's dashboard provider {path}: {e.strerror or e}") from None
    return path


def add_parser(sub) -> None:
    host = sub.add_parser("host", help="the emulated host: start, stop, status, kexec, faults; any host: check; "
                                      "a real host's units: install",
                          description="The emulated host daemon: an emulated machine (Intel DSA devices, IOMMU), "
                                      "its kernel (VFIO cdev, iommufd, LUO, KHO, kexec) and init. `check` says what "
                                      "a kernel (emulated or real) offers a live update. On a real host: "
                                      "`install` writes luvmm's systemd units.")
    host_sub = host.add_subparsers(dest="host_command", metavar="ACTION", parser_class=Parser)
    host_sub.required = True
    start = host_sub.add_parser("start", help="start an emulated host daemon in the background",
                                description="Start an emulated host daemon in the background. VMs defined in the "
                                            "state dir by an earlier run boot again, cold, on a host with that "
                                            "run's options (--devices, --metrics-port...) unless given now.")
    state_dir_arg(start)
    start.add_argument("--devices", type=device_count,
                       help="number of DSA functions, 1-64 (default 1, or the earlier host's: see below)")
    profile_arg(start)
    bandwidth_arg(start)
    guest_cpus_arg(start)
    start.add_argument("--no-agent", action="store_true", help="do not start the LUO agent unit")
    metrics_port_arg(start, "the host's (devices, kexecs, units)")
    # Not said: as the host that ran in the state dir before had it, if it kept VMs there (else the default).
    start.set_defaults(kernel_profile=None, dsa_bandwidth=None)
    host_arg(start, "`luvmm host start` starts an emulated host; a real host's agent and VMs are its init's "
                    "(`luvmm host install` writes the systemd units)")
    start.set_defaults(func=_cmd_host_start)
    stop = host_sub.add_parser("stop", help="stop the emulated host (its units are killed)",
                               description="Stop the emulated host: its units are killed and its files removed; "
                                           "the definitions of its VMs stay (a host started there boots them).")
    state_dir_arg(stop)
    host_arg(stop, "`luvmm host stop` stops an emulated host; on a real host `luvmm vm stop NAME` stops a VM")
    stop.set_defaults(func=_cmd_host_stop)
    status = host_sub.add_parser("status", help="devices, open files, sessions, units, kexec count")
    state_dir_arg(status)
    json_arg(status, "the status")
    host_arg(status, "`luvmm host status` is the emulated host daemon's; on a real host: `luvmm vm status`, "
                     "`luvmm host check`")
    status.set_defaults(func=_cmd_host_status)
    chk = host_sub.add_parser(
        "check", help="what the running kernel offers a live update, and what each missing piece means",
        description="Probe the host's kernel: /dev/liveupdate, KHO, which files LUO preserves (a memfd, a VFIO "
                    "cdev fd, an iommufd; the HWPT-preserve ioctl) -- tried on a throw-away session, so nothing "
                    "is changed -- kexec_file_load, an IOMMU, the device bound to vfio-pci and its IOMMU group; "
                    "for each missing piece, what it means for a VM. Exit status 0: an update keeps the VM, its "
                    "device and its DMA; 4: it keeps the VM, the device is reset; 1: no live update possible.")
    host_arg(chk)
    chk.add_argument("--device", metavar="BDF", help="the PCI function to check (default: the first bound to vfio-pci)")
    state_dir_arg(chk)
    json_arg(chk, "{findings: [{name, present, detail, consequence}], vm_survives, dma_continuity}")
    chk.set_defaults(func=_cmd_host_check)
    faults = host_sub.add_parser(
        "faults", help="inject faults into the emulated kernel's live-update path, or clear them",
        description="Fault injection (off unless asked for). A fault is POINT[:HANDLER][@SESSION]=ACTION. "
                    "POINT: preserve, freeze, retrieve, finish (a LUO file handler's callback; HANDLER memfd-v1, "
                    "vfio-pci-v1 or iommufd-v1; SESSION a VM's name), kexec (the reboot call), kho (the image). "
                    "ACTION: fail (EIO), stall:SECONDS, kill:UNIT (init SIGKILLs agent or vm-NAME there), "
                    "clear-bus-master (kexec: the new kernel clears Bus Master Enable of preserved devices), "
                    "corrupt, truncate or skew (kho: damaged, or well-formed but not this kernel's). The same list "
                    "in LUVMM_FAULTS sets them when the host starts. With no argument: the faults in force.")
    state_dir_arg(faults)
    faults.add_argument("spec", nargs="*", metavar="FAULT", help="faults to add, e.g. freeze:memfd-v1=fail")
    faults.add_argument("--clear", action="store_true", help="remove every fault first")
    json_arg(faults, "the faults in force")
    host_arg(faults, "faults are injected into the emulated kernel only")
    faults.set_defaults(func=_cmd_host_faults)
    kexec = host_sub.add_parser(
        "kexec", help="reboot the emulated kernel with kexec (LUO preserves sessions)",
        description="reboot(LINUX_REBOOT_CMD_KEXEC) on the emulated host: LUO freezes and hands over its "
                    "sessions, a new kernel boots, init starts the units again. Refused while VMs run (a bare "
                    "kexec saves no machine state: use `luvmm update`), unless --force.")
    state_dir_arg(kexec)
    kexec.add_argument("--force", action="store_true", help="kexec even though VMs run (they are lost)")
    json_arg(kexec, "what the kexec did")
    host_arg(kexec, "no bare kexec of a real host: `luvmm update --host real --kernel IMAGE` live-updates it "
                    "with its VMs")
    kexec.set_defaults(func=_cmd_host_kexec)
    install = host_sub.add_parser(
        "install", help="write a real host's systemd units (the agent, a VMM per VM, luvmm.target)",
        description="Write luvmm's systemd units to ROOT/etc/systemd/system: luvmm-agent.service, the template "
                    "luvmm-vm@.service (one instance per VM) and luvmm.target. They run this Python and this "
                    "tree with --host real --state-dir /var/lib/luvmm. Each file is written whole or not at "
                    "all. With ROOT / and a systemctl, systemd reloads them (systemctl daemon-reload); nothing "
                    "is enabled or started.")
    install.add_argument("--root", metavar="DIR", default="/",
                         help="write under DIR/etc/systemd/system (default /: this host's)")
    install.add_argument("--dry-run", action="store_true", help="print the files instead of writing them")
    guest_cpus_arg(install)
    install.add_argument("--systemd-version", type=int, metavar="N",
                         help="write for systemd N (default: what `systemctl --version` says, else a current one):"
                              " before 254, one restart delay instead of growing ones")
    install.set_defaults(func=_cmd_host_install)
