"""Talking to the LUO agent (from a VMM, or from `luvmm update`)."""

from __future__ import annotations

import errno
import os
import _socket
import time

from luvmm.wire import decode_json, encode_json, recv_msg, send_msg
from liveupdate.state import StateDir


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
        send_msg(self.sock, encode_json(obj), fds)

    def recv(self) -> tuple[dict | None, list[int]]:
        data, fds = recv_msg(self.sock)
        return (decode_json(data) if data else None), fds

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
        try:
            self.send(request, fds)
            reply, fds = self.recv()
        except (BrokenPipeError, ConnectionResetError):
            reply, fds = None, []
        if reply is None:
            raise AgentError(errno.ECONNRESET, "the LUO agent went away")
        if "errno" in reply:
            for fd in fds:
                os.close(fd)
            raise AgentError(reply["errno"], reply.get("error") or os.strerror(reply["errno"]))
        return reply.get("ok"), fds

    def hello(self) -> dict:
        return self.call({"op": "hello"})[0]

    def create_session(self, name: str, *, fresh: bool = False) -> int:
        """This VM's outgoing session (``fresh``: a new one, replacing what an earlier VMM left)."""
        return self.call({"op": "create-session", "name": name, "fresh": fresh})[1][0]

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

    def store_fds(self, name: str, meta: dict, fds: dict[str, int]) -> None:
        """Give the agent ``{token: fd}`` (and ``meta``) to hand back to this VM's next VMM."""
        self.call({"op": "store-fds", "name": name, "tokens": list(fds), "meta": meta}, list(fds.values()))

    def fetch_fds(self, name: str) -> tuple[dict, dict[str, int]] | None:
        """(meta, {token: fd}) that a previous VMM of ``name`` stored, or None."""
        try:
            reply, fds = self.call({"op": "fetch-fds", "name": name})
        except AgentError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        if len(fds) != len(reply["tokens"]):
            for fd in fds:
                os.close(fd)
            raise AgentError(errno.EPROTO, "the agent's fd store answered with the wrong number of fds")
        return reply["meta"], dict(zip(reply["tokens"], fds))

    def drop_fds(self, name: str) -> None:
        self.call({"op": "drop-fds", "name": name})

    def release(self, name: str) -> list[str]:
        """The VM is stopped for good: the agent lets go of its session, files and channel."""
        return self.call({"op": "release", "name": name})[0]["released"]

    def restored(self, name: str, report: dict) -> None:
        self.call({"op": "restored", "name": name, "report": report})


def wait_for_agent(state: StateDir, timeout: float = 60.0, *, not_pid: int | None = None) -> tuple[AgentClient, dict]:
    """Connect to the agent, waiting for one to start (and, with ``not_pid``, for a
    new one to replace that process, as after a kexec)."""
    deadline = time.monotonic() + timeout
    last = "no agent"
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
        time.sleep(0.002)  # the agent is a separate process being restarted by init: poll its socket
    raise AgentError(errno.ETIMEDOUT, f"the LUO agent did not come up in {timeout:.0f} s ({last})")
