"""Talking to the LUO agent (from a VMM, or from `luvmm update`)."""

from __future__ import annotations

import errno
import _socket
import time

from luvmm import rpc
from luvmm.liveupdate.state import StateDir


class AgentError(OSError):
    pass


class AgentClient:
    """A synchronous connection to ``agent.sock``."""

    def __init__(self, state: StateDir):
        self.state = state
        #: Whether a call that finds the agent gone waits for the agent init
        #: starts next and asks it again (a VMM's calls: each is one it may repeat).
        self.retry = False
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(state.agent_socket)
        except OSError as e:
            self.sock.close()
            raise AgentError(e.errno or errno.ECONNREFUSED, f"no LUO agent at {state.agent_socket}") from None

    def close(self) -> None:
        self.sock.close()

    def send(self, obj: dict, fds: list[int] = ()) -> None:
        rpc.send(self.sock, obj, fds)

    def recv(self) -> tuple[dict | None, list[int]]:
        return rpc.recv(self.sock)

    def call(self, request: dict, fds: list[int] = ()) -> tuple[object, list[int]]:
        try:
            return self._call(request, fds)
        except AgentError as e:
            if not self.retry or e.errno != errno.ECONNRESET:
                raise
        self.sock.close()
        self.sock = wait_for_agent(self.state, 30)[0].sock
        return self._call(request, fds)

    def _call(self, request: dict, fds: list[int] = ()) -> tuple[object, list[int]]:
        # A request that waits ("timeout": T) may take up to three such waits
        # at the agent (the update under way, the registrations, the VMMs).
        wait = request.get("timeout")
        timeout = 3 * float(wait) + 30 if isinstance(wait, (int, float)) else rpc.DEFAULT_TIMEOUT
        try:
            return rpc.call(self.sock, request, fds, timeout=timeout, who="the LUO agent")
        except rpc.RpcError as e:
            raise AgentError(e.errno, e.strerror) from None

    def hello(self) -> dict:
        return self.call({"op": "hello"})[0]

    def create_session(self, name: str, *, fresh: bool = False) -> tuple[int, bool]:
        """This VM's outgoing session (``fresh``: a new one, replacing what an
        earlier VMM left), and whether it was created now (empty: nothing of
        the VM is preserved in it yet)."""
        reply, fds = self.call({"op": "create-session", "name": name, "fresh": fresh})
        return fds[0], bool(reply.get("created")) if isinstance(reply, dict) else True

    def retrieve_session(self, name: str) -> int | None:
        """The incoming session of ``name``, or None when the previous kernel handed none over."""
        try:
            return self.call({"op": "retrieve-session", "name": name})[1][0]
        except AgentError as e:
            if e.errno == errno.ENOENT:
                return None
            raise

    def resumed(self, name: str) -> None:
        """Tell the agent that ``name``'s guest runs again: it holds its own
        start-up work (``import trio``) until then, off the blackout."""
        self.call({"op": "resumed", "name": name})

    def hold(self, name: str) -> None:
        """``name`` is about to be started or stopped: EBUSY if an update is
        in progress; else no update starts until :meth:`release` (or this
        connection closes)."""
        self.call({"op": "hold", "name": name})

    def release(self, name: str) -> list[str]:
        """The VM is stopped for good: the agent lets go of its session, files and channel."""
        return self.call({"op": "release", "name": name})[0]["released"]

    def restored(self, name: str, report: dict) -> None:
        self.call({"op": "restored", "name": name, "report": report})


#: How often a VMM on the restore path looks for the agent: it waits for its
#: session, the guest with it.
POLL_S = 0.0005
#: A client waiting for the agent of the next kernel (`luvmm update`) looks
#: less and less often, up to this: it is not on the blackout's path, but
#: every look is on a CPU the restore needs -- asking the old agent for its
#: pid while it freezes, trying a socket the new one has not bound yet.  At
#: POLL_S throughout, it lengthened the blackout by ~6 ms (p50 51.4 -> 45.3
#: ms on this project's 2-core machine, beside it in one run): the new agent
#: came up late, and the restoring VMM waited for it.
NEXT_AGENT_POLL_MAX_S = 0.02


def wait_for_agent(state: StateDir, timeout: float = 60.0, *, not_pid: int | None = None) -> tuple[AgentClient, dict]:
    """Connect to the agent, waiting for one to start (and, with ``not_pid``, for a
    new one to replace that process, as after a kexec)."""
    deadline = time.monotonic() + timeout
    last = "no agent"
    pause = POLL_S
    while time.monotonic() < deadline:
        try:
            client = AgentClient(state)
            hello = client.hello()
            if not_pid is None or hello["pid"] != not_pid:
                return client, hello
            update = hello.get("update") or {}
            if update.get("phase") == "failed":
                return client, hello
            client.close()
            last = f"agent {not_pid} is still the old one"
        except OSError as e:
            last = str(e)
        time.sleep(pause)  # the agent is a separate process being restarted by init: poll its socket
        if not_pid is not None:
            pause = min(2 * pause, NEXT_AGENT_POLL_MAX_S)
    raise AgentError(errno.ETIMEDOUT, f"the LUO agent did not come up in {timeout:.0f} s ({last})")
