"""What every `luvmm` command shares: the conventions of luvmm.cli (one-line
errors, --json, sizes, progress), the argument types and options, and the
way to reach a host."""

from __future__ import annotations


import argparse
import json
import os
import sys

from luvmm import exitcodes

DEFAULT_DSA_BANDWIDTH = 64 << 20
#: Guest RAM when --memory is not given, for every command that starts VMs.
DEFAULT_MEMORY = 256 << 20
PROFILES = ("continuous-dma", "reset-on-freeze")


class CliError(Exception):
    """A command that cannot do what was asked: one line, and this exit status."""

    def __init__(self, message: str, status: int = exitcodes.FAILED):
        super().__init__(message)
        self.status = status


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and status 2), not the usage block."""

    def error(self, message: str):
        self.exit(exitcodes.USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


# --- argument types -------------------------------------------------------------------------


def byte_size(text: str) -> int:
    """A byte count: N, or N with a K/M/G/T suffix (powers of two; KiB, M, 1.5G...)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 64K, 256M, 1G)") from None
    if value < 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (a whole, non-negative number of bytes)")
    if value >= 1 << 62:
        raise argparse.ArgumentTypeError(f"{text!r}: too big (at most 4096T)")
    return int(value)


def guest_memory(text: str) -> int:
    """Guest RAM: a size the VM can have (checked here: one line, not a failure inside the VMM)."""
    from luvmm.vmm.guest import MIN_MEMORY

    size = byte_size(text)
    if size < MIN_MEMORY or size % (2 << 20):
        raise argparse.ArgumentTypeError(f"guest RAM {text!r}: a multiple of 2 MiB, at least {MIN_MEMORY >> 20}M")
    return size


def guest_memories(text: str) -> list[int]:
    """Comma-separated guest RAM sizes (at least one)."""
    sizes = [guest_memory(part) for part in text.split(",") if part.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError(f"no size in {text!r}")
    return sizes


def count_list(text: str) -> list[int]:
    """Comma-separated counts ("" for none)."""
    return [positive_int(part) for part in text.split(",") if part.strip()]


def count(text: str) -> int:
    """A whole number, 0 or more."""
    return 0 if text.strip() == "0" else positive_int(text)


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def device_count(text: str) -> int:
    from luvmm.liveupdate.emu.machine import MAX_DEVICES

    n = positive_int(text)
    if n > MAX_DEVICES:
        raise argparse.ArgumentTypeError(f"at most {MAX_DEVICES} devices, not {n}")
    return n


def vcpu_count(text: str) -> int:
    n = positive_int(text)
    if n > 16:
        raise argparse.ArgumentTypeError(f"at most 16 vCPUs, not {n}")
    return n


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"seconds must be positive, not {text!r}")
    return value


def vm_name_arg(text: str) -> str:
    from luvmm.liveupdate.state import check_vm_name

    try:
        return check_vm_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def listen_address(text: str) -> str:
    from luvmm.metrics.http import parse_listen

    try:
        parse_listen(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def metrics_url(listen: str) -> str:
    from luvmm.metrics.http import parse_listen

    address, port = parse_listen(listen)
    return f"{address}:{port}"


# --- shared options and output ----------------------------------------------------------------


HOSTS = ("emulated", "real")
#: A real host's state dir: on a disk, it outlives a kexec.  The units of `luvmm host install` run with it
#: (luvmm.wiring.systemd.STATE_DIR, not imported here: `luvmm --help` stays fast; a test holds them equal).
REAL_STATE_DIR = "/var/lib/luvmm"
#: A real host's sockets (luvmm.liveupdate.state.runtime_dir): what RuntimeDirectory= gives luvmm's systemd units.
REAL_RUNTIME_DIR = "/run/luvmm"


def host_arg(p: argparse.ArgumentParser, emulated_only: str | None = None) -> None:
    """``--host emulated|real`` (default ``$LUVMM_HOST``, else emulated),
    resolved once for every command by :func:`resolve_host` into
    ``args.host``.  ``emulated_only``: why the command has no real-host
    form -- a real host, asked for, is refused with it (exit status 2)."""
    what = ("an emulated host only: --host real is refused" if emulated_only else
            "real: this machine's kernel and init, state in /var/lib/luvmm; emulated: the emulated host daemon")
    p.add_argument("--host", choices=HOSTS, help=f"{what} (default: $LUVMM_HOST, else emulated)")
    p.set_defaults(emulated_only=emulated_only)


def resolve_host(args: argparse.Namespace) -> None:
    """``args.host``: "emulated" or "real", from --host or $LUVMM_HOST; CliError
    (exit status 2) for a bad $LUVMM_HOST or a real host where the command
    has none.  Called by luvmm.cli.main for every command with --host."""
    if not hasattr(args, "host"):
        return
    source = f"--host {args.host}"
    if args.host is None:
        args.host = os.environ.get("LUVMM_HOST") or "emulated"
        source = f"LUVMM_HOST={args.host}"
        if args.host not in HOSTS:
            raise CliError(f"{source}: not emulated or real", exitcodes.USAGE)
    if args.host == "real" and getattr(args, "emulated_only", None):
        raise CliError(f"{source}: {args.emulated_only}" +
                       (" (--host emulated overrides it)" if source.startswith("LUVMM_HOST") else ""),
                       exitcodes.USAGE)
    if args.host == "real":
        # Where a real host's sockets are, for this command and what it starts (`luvmm boot`'s init, its units).
        os.environ.setdefault("LUVMM_RUNTIME_DIR", REAL_RUNTIME_DIR)


def state_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", metavar="DIR",
                   help="the host's state dir (default: $LUVMM_STATE_DIR, else on a real host "
                        f"{REAL_STATE_DIR}, on the emulated host $XDG_RUNTIME_DIR/luvmm, else /tmp/luvmm-UID)")


def json_arg(p: argparse.ArgumentParser, what: str, to_file: bool = False) -> None:
    """``--json``: the result as one JSON document on stdout instead of text.
    With ``to_file`` (the long runs: benchmarks, updates) ``--json FILE``
    writes it to FILE instead, and the text is printed as without --json."""
    if not to_file:
        p.add_argument("--json", action="store_true",
                       help=f"print {what} as one JSON document on stdout instead of text")
        return
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help=f"print {what} as one JSON document on stdout instead of text; "
                        "with FILE, write it there (and print the text)")


def check_json_file(dest) -> None:
    """Refuse a ``--json FILE`` that cannot be written before a long run, not after it."""
    if dest in (None, False, True, "-"):
        return
    from luvmm.outfiles import UnsafeOutput, check_file

    try:
        check_file(dest)
    except UnsafeOutput as e:
        raise CliError(f"--json {dest}: {e}", exitcodes.USAGE) from None


def emit(result, dest, text) -> None:
    """Print ``result`` as ``--json`` asks (``dest``: None, ``"-"`` or a file),
    or ``text()`` -- both, when the JSON goes to a file."""
    if dest in (True, "-"):
        print_json(result)
        return
    if dest:
        from luvmm.outfiles import UnsafeOutput, write_file

        try:  # whole or not at all, never through a symlink
            write_file(dest, (json.dumps(result, indent=2) + "\n").encode())
        except UnsafeOutput as e:
            raise CliError(f"--json {dest}: {e}") from None
        except OSError as e:
            raise CliError(f"--json {dest}: {e.strerror or e}") from None
    body = text()
    if body:
        print(body)


def memory_args(p: argparse.ArgumentParser, what: str = "guest RAM") -> None:
    p.add_argument("--memory", type=guest_memory, default=DEFAULT_MEMORY, metavar="SIZE",
                   help=f"{what}, e.g. 256M or 4G (default {DEFAULT_MEMORY >> 20}M)")
    p.add_argument("--overcommit", action="store_true",
                   help="allow VMs whose RAM adds up to more than the machine has")


def guest_arg(p: argparse.ArgumentParser, auto: bool = True) -> None:
    choices = ("auto", "firmware", "synthetic") if auto else ("firmware", "synthetic")
    p.add_argument("--guest", choices=choices, default=choices[0],
                   help="firmware: the guest firmware under KVM; synthetic: the same DMA workload driven from the "
                        "host side (no KVM needed)" + ("; auto (default): firmware where /dev/kvm is usable"
                                                        if auto else " (default firmware)"))


def profile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel-profile", choices=PROFILES, default=PROFILES[0],
                   help="what the emulated kernel does to a preserved device: continuous-dma (default) keeps it "
                        "DMAing through the kexec; reset-on-freeze (the upstream series) resets it at freeze")


def bandwidth_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dsa-bandwidth", type=byte_size, default=DEFAULT_DSA_BANDWIDTH, metavar="BYTES",
                   help="bytes per second each emulated DSA moves, e.g. 1G, or 0 for as fast as memcpy (default 64M: "
                        "slow enough that work queued before a live update outlasts its blackout)")


def cpu_list(text: str) -> str:
    """A CPU list ("0,2-3"), checked."""
    from luvmm.liveupdate.state import parse_cpu_list

    try:
        cpus = parse_cpu_list(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    missing = cpus - set(os.sched_getaffinity(0))
    if missing:
        raise argparse.ArgumentTypeError(f"CPU {min(missing)} is not one this process may run on")
    return text


def guest_cpus_arg(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """--guest-cpus: the CPUs set apart for the guests' vCPUs."""
    if default == "auto":
        p.add_argument("--guest-cpus", type=lambda t: t if t in ("auto", "none") else cpu_list(t), default="auto",
                       metavar="LIST|auto|none",
                       help="CPUs set apart for the vCPUs, which the emulated host and luvmm's own processes keep "
                            "off once the guests run (auto, the default: the highest-numbered CPUs, one per vCPU, "
                            "leaving one to the rest; none: share every CPU)")
    else:
        p.add_argument("--guest-cpus", type=cpu_list, metavar="LIST",
                       help="CPUs set apart for the guests' vCPUs (e.g. 1 or 2-3): the vCPUs run there, and "
                            "luvmm's own processes -- and an emulated host's DSA engines and kernel, Python on this "
                            "machine -- keep off them once the guests run (default: none, every CPU shared)")


def metrics_port_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--metrics-port", metavar="[ADDRESS:]PORT", type=listen_address,
                   help=f"serve {what} Prometheus metrics over HTTP at /metrics (on loopback unless ADDRESS "
                        "is given); docs/metrics-and-report.md lists them")


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def say(message: str) -> None:
    print(message, file=sys.stderr)


def progress():
    """A progress printer for long work: lines on stderr when it is a terminal, else None."""
    if not sys.stderr.isatty():
        return None
    return lambda line: print(f"  {line}", file=sys.stderr, flush=True)


def is_real(args: argparse.Namespace) -> bool:
    return getattr(args, "host", None) == "real"


def state_dir_of(args: argparse.Namespace) -> str:
    """--state-dir, else $LUVMM_STATE_DIR, else the host's default (:data:`REAL_STATE_DIR` on a real host)."""
    from luvmm.liveupdate.state import default_state_dir

    if args.state_dir:
        return args.state_dir
    if is_real(args):
        return os.environ.get("LUVMM_STATE_DIR") or REAL_STATE_DIR
    return default_state_dir()


def state_of(args: argparse.Namespace):
    from luvmm.liveupdate.state import StateDir

    return StateDir.of_host(state_dir_of(args), getattr(args, "host", None) or "emulated")


def running_host(args: argparse.Namespace):
    """The state dir of the host a command reads or acts on, or CliError:
    never starts a host, never creates a state dir.  The emulated host: its
    daemon must be running.  A real host runs as long as this command does:
    its state dir, checked as safe if it is there."""
    if is_real(args):
        state = state_of(args)
        if state.exists():
            state.check_safe()
        return state
    from luvmm.liveupdate.emu.hostctl import HostError, find

    try:
        return find(state_dir_of(args))
    except HostError as e:
        raise CliError(str(e)) from None


def check_host(args: argparse.Namespace, device: str | None) -> dict:
    """What the host's kernel offers a live update of ``device``
    (luvmm.liveupdate.check.check: `luvmm host check`), the preservation probed by
    the LUO agent where it holds /dev/liveupdate."""
    from luvmm.liveupdate.check import check
    from luvmm.wiring import connect

    state = running_host(args)
    host, services = connect(args.host, None if is_real(args) else state.socket)

    def ask_agent(device):
        if not os.path.exists(state.agent_socket):
            return None
        from luvmm.liveupdate.agent_client import AgentClient

        try:
            client = AgentClient(state)
        except OSError:
            return None
        try:
            return client.call({"op": "check", "device": device})[0]
        except OSError as e:
            return {"error": f"the agent's check: {e.strerror or e}"}
        finally:
            client.close()

    try:
        result = check(host, services.machine, device, ask_agent)
    finally:
        if not is_real(args):
            host.close_connection()
    result["host"] = args.host
    return result


class Connection:
    """``with _connect(state) as host``: a connection to the daemon, always closed."""

    def __init__(self, state):
        from luvmm.liveupdate.emu.client import connect

        self.host = connect(state.socket)

    def __enter__(self):
        return self.host

    def __exit__(self, *exc):
        self.host.close_connection()


def pick_guest(choice: str) -> str:
    """--guest auto: the firmware under KVM where /dev/kvm is usable, else the synthetic guest."""
    if choice != "auto":
        return choice
    from luvmm.vmm.kvm import kvm_available

    ok, why = kvm_available()
    if not ok:
        say(f"no usable KVM ({why}): running the synthetic guest")
    return "firmware" if ok else "synthetic"


def report_updates(summary: dict, as_json, interrupted: str | None = None, command: str = "update") -> int:
    """Print a run of live updates (table or JSON) and return its exit status
    (why it is not 0: one line ``luvmm COMMAND: why``)."""
    from luvmm.liveupdate.update import format_cycles, outcome

    status, why = outcome(summary)
    if interrupted:
        summary["interrupted"] = interrupted
    emit(summary, as_json, lambda: format_cycles(summary) if summary["cycles"] else "")
    if interrupted:
        say(interrupted)
        return exitcodes.INTERRUPTED
    if status != exitcodes.OK:
        say(f"luvmm {command}: {why}")
    return status
