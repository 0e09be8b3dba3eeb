"""The `luvmm` command line: a package of small command modules (uapi, demo,
host, boot, vm, update, bench, lab) over the same APIs a user's script would
call (luvmm.vmm.manage, luvmm.liveupdate.update, luvmm.tools); ``common`` holds what they
share.

Each subcommand imports what it needs when it runs, so `luvmm --help` and the
restore path stay fast.

Conventions, the same for every command (docs/cli.md):
* a mistake on the command line is one line on stderr and exit status 2;
  anything else that fails is one line ``luvmm CMD: why`` and a non-zero
  status from :mod:`luvmm.exitcodes` -- never a traceback;
* ``--host emulated|real`` (default ``$LUVMM_HOST``, else emulated) on
  every command that talks to a host: the emulated host's daemon, or this
  machine's kernel and init with its state in /var/lib/luvmm; a command
  that only an emulated host has refuses a real one (exit status 2);
* ``--json`` prints the command's result as one JSON document on stdout
  instead of the text (messages stay on stderr);
* sizes are ``N[K|M|G|T]`` (powers of two) everywhere;
* only `luvmm vm start` starts an emulated host where none runs (and says
  so); a command that reads or acts on a host never starts one;
* long work prints a progress line per step on stderr when it is a
  terminal, nothing extra otherwise;
* Ctrl-C stops cleanly: what was done so far is printed, the host is left
  as it was, exit status 130.
"""

from __future__ import annotations

import argparse
import sys

from luvmm import __version__, exitcodes
from luvmm.cli import bench, boot, demo, host, lab, update, uapi, vm
from luvmm.cli.common import CliError, Parser, resolve_host, say

#: The commands, in the order `luvmm --help` lists them.
COMMANDS = (uapi, demo, host, boot, vm, update, bench, lab)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="luvmm",
        description="A userspace VMM whose VM, passed-through PCI device and DMA survive a host "
                    "live update (LUO/KHO + kexec).",
        epilog="Exit status: 0 all good; 1 failed (nothing changed, or put back); 2 bad command line; "
               "3 live updates done but DMA damaged or the guest stuck; 4 live updates done, the VM kept, its "
               "device reset by the kernel (DMA stopped); 130 interrupted (Ctrl-C, SIGTERM, SIGHUP).")
    parser.add_argument("--version", action="version", version=f"luvmm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def _expected_errors() -> tuple[type, ...]:
    """The errors that are a refusal, said in one line -- not bugs."""
    from luvmm.liveupdate.agent_client import AgentError
    from luvmm.liveupdate.emu.hostctl import HostError
    from luvmm.liveupdate.state import StateError
    from luvmm.vmm.manage import VmError

    return CliError, HostError, StateError, VmError, AgentError


def _terminate_as_interrupt() -> None:
    """SIGTERM (`kill`, a CI job's timeout, a service manager) and SIGHUP
    (the terminal went away) end a command the way Ctrl-C does: as a
    KeyboardInterrupt, so that what it started is stopped and what it made
    is removed on the way out -- a demo's or a benchmark's embedded host and
    its temp dir, a half-started VM -- instead of the process vanishing and
    leaving them running.  Only where the signal has its default action (not
    under nohup, which ignores SIGHUP)."""
    import signal

    def interrupt(signum, frame):
        # Through whatever handles SIGINT now: inside trio.run that is trio's,
        # which raises KeyboardInterrupt only where its internals are not
        # protected (else it delivers it to the main task at a checkpoint).
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, interrupt)


def entry() -> int:
    """The `luvmm` process (its console script, ``python -m luvmm``): the
    signals that end it are its own to set, not those of a caller of main."""
    _terminate_as_interrupt()
    return main()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    what = " ".join(x for x in (args.command, *(getattr(args, a, None) for a in
                                                ("host_command", "vm_command", "bench", "lab_command"))) if x)
    try:
        resolve_host(args)
        return args.func(args)
    except BrokenPipeError:  # `luvmm uapi | head`
        sys.stderr.close()
        return exitcodes.OK
    except KeyboardInterrupt:
        say(f"luvmm {what}: interrupted")
        return exitcodes.INTERRUPTED
    except Exception as e:
        if isinstance(e, _expected_errors()):
            say(f"luvmm {what}: {e.strerror if isinstance(e, OSError) and e.strerror else e}")
            return getattr(e, "status", exitcodes.FAILED)
        if isinstance(e, OSError):  # the system said no (a file, a socket): say what
            where = f" ({e.filename})" if e.filename else ""
            say(f"luvmm {what}: {e.strerror or e}{where}")
            return exitcodes.FAILED
        raise
