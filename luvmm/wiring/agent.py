"""The LUO agent's unit: what init runs (`python -S -c "from
luvmm.wiring.agent import main ..."`).  It wires the agent
(luvmm.liveupdate.agent.Agent) to its host -- the real kernel and systemd, or the
emulated host -- and serves: first the restoring VMMs, before trio is
imported (Agent.fast_restore), then everything."""

from __future__ import annotations

import _signal
import gc
import os
import sys

from luvmm.liveupdate.agent import Agent, _import_trio, log
from luvmm.liveupdate.state import StateDir, die_with_init, parse_unit_args, unit_boot, use_every_cpu
from luvmm.wire import listen_seqpacket
from luvmm.wiring import connect


def main(argv: list[str] | None = None) -> int:
    die_with_init()
    use_every_cpu()  # serving the restoring VMMs, every CPU; once their guests run, none of theirs
    args = parse_unit_args(sys.argv[1:] if argv is None else argv, name_required=False)
    state = StateDir.of_host(args["state_dir"], args["host"])
    # Listening first: a restoring VMM that comes for its session connects at
    # once and waits for the answer, rather than polling a socket not there yet.
    path = state.runtime_path("agent.sock")
    listener = listen_seqpacket(path, lean=True)
    mine = os.stat(path).st_ino

    def unlink_mine():
        """An agent that goes leaves no socket behind that nobody answers
        (and never removes the one an agent started after it made)."""
        try:
            if os.stat(path).st_ino == mine:
                os.unlink(path)
        except OSError:
            pass

    def on_sigterm(signum, frame):  # init's stop: the socket goes, then the process, as SIGTERM does
        unlink_mine()
        _signal.signal(signum, _signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    _signal.signal(_signal.SIGTERM, on_sigterm)
    try:
        host, services = connect(args["host"], os.environ.get("LUVMM_HOST_SOCKET", state.socket), state.path)
        agent = Agent(host, state, services.units, boot=unit_boot())
        listener, early = agent.fast_restore(listener)  # ends with guests_first(): its imports must not take their CPU
        gc.enable()  # off since the unit started (luvmm.liveupdate.state.python_unit)
        import logging as _logging

        _logging.basicConfig(level=_logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        log.info("agent up (%s boot); update on disk: %s", agent.boot, agent.update and agent.update.get("id"))
        _import_trio().run(agent.serve, listener, early)
    finally:
        unlink_mine()
    return 0


if __name__ == "__main__":
    sys.exit(main())
