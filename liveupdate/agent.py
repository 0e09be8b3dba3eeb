"""The LUO agent (the role of luod): a unit of the host's init.

It is the single opener of /dev/liveupdate.  VMMs ask it for their named
session fd -- a new outgoing one before an update, the incoming one that the
previous kernel handed over after it -- and register a channel on which the
agent coordinates updates.  An update, asked for by ``luvmm update``:

1. once every VM unit's VMM has registered, ``prepare`` goes to each; each pauses its guest, saves its
   state and preserves its files, and answers ready (or an error);
2. if one fails or does not answer in time, the others get ``cancel`` and
   resume as they were (rollback), and the update fails;
3. otherwise the agent writes the update to disk (the state dir) and triggers
   the kexec -- which kills it, like every process;
4. after the reboot init starts it again; it reads the update from disk and
   collects each restored VMM's report, which ``luvmm update`` fetches.

The agent holds every session fd it hands out: a VMM that dies before the
kexec does not take its preservation with it, and a restarted one gets its
session back.  (A VMM's own files -- RAM, iommufd, device -- it leaves with
init, in its unit's fd store: luvmm.liveupdate.fdstore.)  It speaks to the host
only through the host interface, so it runs unchanged on a real host.

Who may ask what (the peer is identified by SO_PEERCRED and SO_PEERPIDFD:
luvmm.peer): a VM's requests (its sessions, its registration, its reports)
only from that VM's unit; the operator's (update, result, status, hold,
release, abandon) only from a process of no unit; ``hello`` from anyone.  A peer that
cannot be identified, or a process that left its unit, gets EPERM.

Protocol: SOCK_SEQPACKET at ``agent.sock`` in the state dir, one JSON object
per message, fds by SCM_RIGHTS (luvmm.rpc).

Why this long: the update's record on disk, the server of its clients (the
plain-socket restore path and the trio server) and the orchestration of an
update share the agent's state. Splitting it by concern is still to do (issue
25, item 3).
"""

from __future__ import annotations

import _socket
import errno
import os
import time

from luvmm.wire import ProtocolError, close_fds, listen_seqpacket
from luvmm import leanjson, rpc, schema
from luvmm.peer import identify
from luvmm.liveupdate.luo import LiveUpdate, Session
from luvmm.liveupdate.state import StateDir, check_vm_name, guests_first, record_imports

_IN_PROGRESS = ("kexec", "rolling-back", "restoring")
#: A restoring update whose VMs have not all reported this long after its
#: kexec never will (a VMM that keeps dying, say): it is failed, so that it
#: blocks no later update.
RESTORE_DEADLINE_S = 300.0
#: How long the VMMs have to pause and save once all are ready: milliseconds
#: normally; a VMM that takes longer holds the others paused this long at most.
PAUSE_TIMEOUT_S = 5.0


class _LazyLog:
    """logging costs ~10 ms to import: only pay it when something is logged."""

    def __getattr__(self, level):
        import logging

        return getattr(logging.getLogger("luvmm.agent"), level)


log = _LazyLog()

# trio is imported only once the restore-time requests are served (see
# Agent.fast_restore): VMMs waiting for their session after a kexec must not
# wait for ``import trio``.
trio = None


def _import_trio():
    global trio
    import trio as _trio

    trio = _trio
    return _trio


#: Requests about one VM (its ``name``): only that VM's unit may make them.
VM_OPS = frozenset({"create-session", "retrieve-session", "register", "restored", "resumed"})
#: The operator's requests: only a process of no unit may make them (``release``: its VM's unit too).
OPERATOR_OPS = frozenset({"update", "result", "status", "hold", "release", "abandon", "check"})
NAMED_OPS = VM_OPS | {"hold", "release"}
#: unit_of's answer for a process that left its unit (luvmm.liveupdate.init.ORPHAN).
ORPHAN = "?orphan"
_UNKNOWN = object()  # a connection whose peer was not looked up yet


class Channel:
    """A connection to the agent (agent side), with one request in flight at a time.

    Once a VMM has registered on it, the agent speaks first and one task
    (:meth:`Agent._watch`) is its only reader: the replies it reads go to
    whoever asked (:meth:`ask`), and the end of the stream -- the VMM exited,
    was stopped or died -- is noticed at once, not at the next update."""

    def __init__(self, conn):
        self.conn = conn
        self.lock = trio.Lock()
        self.peer = _UNKNOWN  # the peer's Peer once looked up (None: it could not be identified)
        self.replies = None  # (send, receive) of a memory channel, once registered

    async def send(self, obj: dict, fds=()) -> None:
        if not await rpc.trio_send(self.conn, obj, fds):
            raise ConnectionResetError("the peer went away")

    async def recv(self) -> tuple[dict | None, list[int]]:
        return await rpc.trio_recv(self.conn)

    async def ask(self, message: dict) -> dict | None:
        """Send a request to the registered VMM and wait for its reply (None: it went away)."""
        async with self.lock:
            try:
                await self.send(message)
            except (OSError, trio.ClosedResourceError):
                return None
            try:
                return await self.replies[1].receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return None


class Agent:
    def __init__(self, host, state: StateDir, units, *, boot: str = "cold", prepare_timeout: float = 30.0):
        self.host = host
        #: The host's init (luvmm.services.Units): who a peer is (the unit it belongs to).
        self.units = units
        self.state = state
        self.boot = boot
        self.prepare_timeout = prepare_timeout
        self.luo = LiveUpdate.open(host)
        self.outgoing: dict[str, Session] = {}
        self.incoming: dict[str, Session] = {}
        self.vmms: dict[str, Channel] = {}
        self.reports: dict[str, dict] = {}
        self.reported = self.registered = None  # trio.Events, made when serve() starts
        self.update_file = os.path.join(state.path, "agent", "update.json")
        #: A real host's TSC rate, measured over this agent's life (from serve() on: not on the
        #: restore path): it times the kexec (luvmm.liveupdate.tsc).
        self.tsc_rate = None
        self.disk_error: str | None = None
        self.update = self._load_update()
        #: An `update` request is getting its VMs ready (before its record
        #: exists): a second one is refused, not run beside it.
        self.preparing = False
        #: VMs being started or stopped (`luvmm vm start|stop`, ``hold``): name ->
        #: the channels of the clients that hold it (two `vm stop`s of one VM
        #: may run at once).  No update starts until every one has released
        #: it, or gone away: the first to go must not let the update in while
        #: the other is still between stopping the VMM and letting go of its
        #: session (the interleavings stress test: the session went into the
        #: next kernel, for a VM no longer defined).
        self.held: dict[str, list[Channel]] = {}
        self.unheld = None  # a trio.Event, made when serve() starts

    # --- the update on disk --------------------------------------------------------------------

    def _load_update(self) -> dict | None:
        try:
            with open(self.update_file, "rb") as f:
                update = leanjson.loads(f.read())
        except (OSError, ValueError):
            return None
        if update.get("phase") == "kexec" and self.boot == "kexec":
            update["phase"] = "restoring" if update.get("vms") else "done"
            update["reports"] = {}
            self._save_update(update)
        elif update.get("phase") in ("kexec", "rolling-back") and self.boot != "kexec":
            # The agent died during the kexec call or the rollback, and no
            # kexec happened: the update failed, and must not block the next.
            update.update(phase="failed", error=update.get("error") or "the agent died during the update")
            self._save_update(update)
        return update

    def _save_update(self, update: dict, *, required: bool = False) -> None:
        """Write the update's record (the next kernel's agent reads it).
        Failing soft (logged) unless ``required``: before the kexec, an
        update whose record cannot be written must not happen."""
        tmp = self.update_file + ".tmp"
        try:
            self.state.make_dir("agent")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                data = leanjson.dumps(update).encode()
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write")
            finally:
                os.close(fd)
            os.replace(tmp, self.update_file)
            self.disk_error = None
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            self.disk_error = f"cannot write {self.update_file}: {e.strerror or e}"
            log.error("%s", self.disk_error)
            if required:
                raise OSError(e.errno or errno.EIO, self.disk_error) from None

    # --- serving -------------------------------------------------------------------------------------

    def fast_restore(self, listener=None, timeout: float = 5.0):
        """Serve what restored VMMs need first -- hello, their sessions -- with
        plain blocking sockets, before trio is imported, and import nothing
        until each of them says its guest runs again (``resumed``) or goes
        away: on a 2-core host the agent's ``import trio`` (~150 ms of CPU)
        would otherwise take a core from the VMMs rebuilding their VMs, and
        lengthen the blackout by a quarter.  Returns the listening socket
        (``listener``, made early by the unit's main, or here) and the
        connections to hand to :meth:`serve` (each with a request it has not
        answered yet, or None)."""
        import select

        if listener is None:
            listener = listen_seqpacket(self.state.runtime_path("agent.sock"), lean=True)
        update = self.update or {}
        expected = set(update.get("vms", [])) if update.get("phase") == "restoring" else set()
        conns: dict[int, tuple] = {}  # fd -> (_socket.socket, unanswered request or None)
        if expected:
            poll = select.poll()
            poll.register(listener.fileno(), select.POLLIN)
            deadline = time.monotonic() + timeout
        retrieved: dict[int, str] = {}  # connection -> the VM whose session it took
        peers: dict[int, object] = {}  # connection -> its peer
        while expected and time.monotonic() < deadline:
            for fd, _ in poll.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                if fd == listener.fileno():
                    newfd, _ = listener._accept()
                    conns[newfd] = (_socket.socket(fileno=newfd), None)
                    poll.register(newfd, select.POLLIN)
                    continue
                conn = conns[fd][0]
                try:
                    request, got = rpc.recv(conn)
                except ProtocolError as e:
                    rpc.send(conn, rpc.error_reply(e))
                    continue
                except OSError:
                    request, got = None, []
                if request is None:
                    poll.unregister(fd)
                    del conns[fd]
                    conn.close()
                    expected.discard(retrieved.pop(fd, None))  # that VMM died: init restarts it
                    continue
                close_fds(got)  # no request to the agent takes fds
                if request.get("op") not in ("hello", "retrieve-session", "create-session", "resumed"):
                    # The async server answers it (e.g. `luvmm update` asking for
                    # the result); restoring VMMs go first.
                    conns[fd] = (conn, (request, []))
                    poll.unregister(fd)
                    expected.discard(retrieved.pop(fd, None))  # e.g. a VMM reporting it cannot restore
                    continue
                try:
                    if fd not in peers and request.get("op") != "hello":
                        peers[fd] = self.identify(conn)
                    self.authorize(request, peers.get(fd, _UNKNOWN))
                    ok, out = self._sync_request(request)
                    reply = {"ok": ok}
                except Exception as e:  # noqa: BLE001 -- every request gets a reply
                    reply, out = rpc.error_reply(e, log), []
                rpc.send(conn, reply, out)
                close_fds(out)
                if "ok" in reply and request["op"] == "retrieve-session":
                    retrieved[fd] = str(request["name"])
                elif "ok" in reply and request["op"] == "resumed":
                    expected.discard(str(request["name"]))
        # Every restored guest runs (or its VMM is gone): from here this
        # process yields to the vCPUs, and keeps off their CPUs.
        guests_first()
        if self.update and self.update.get("phase") in ("restoring", "done", "failed") and self.boot == "kexec":
            record_imports("agent-served-restore")
        # Hand everything over as the socket.socket objects trio wraps.
        import socket

        return socket.socket(fileno=listener.detach()), [(socket.socket(fileno=c.detach()), first)
                                                          for c, first in conns.values()]

    async def serve(self, listener=None, early=(), *, task_status=None) -> None:
        _import_trio()
        if self.host.kind == "real":
            from luvmm.liveupdate import tsc

            self.tsc_rate = tsc.Rate()
        self.reported, self.registered, self.unheld = trio.Event(), trio.Event(), trio.Event()
        listener = trio.socket.from_stdlib_socket(listener or listen_seqpacket(self.state.agent_socket))
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            for conn, first in early:
                nursery.start_soon(self._client, Channel(trio.socket.from_stdlib_socket(conn)), first)
            if task_status is not None:
                task_status.started()
            await rpc.Listener(who="the LUO agent").run(listener, lambda conn: self._client(Channel(conn)), nursery)

    async def _client(self, ch: Channel, first: tuple[dict, list[int]] | None = None) -> None:
        registered = None
        with ch.conn:
            while True:
                if first is not None:
                    (request, fds), first = first, None
                else:
                    try:
                        async with ch.lock:
                            request, fds = await ch.recv()
                    except ProtocolError as e:
                        await self._reply(ch, rpc.error_reply(e))
                        continue
                    except (OSError, trio.ClosedResourceError):
                        break
                if request is None:
                    break
                close_fds(fds)  # no request to the agent takes fds
                out: list[int] = []
                try:
                    if ch.peer is _UNKNOWN and request.get("op") != "hello":
                        ch.peer = self.identify(ch.conn)
                    self.authorize(request, ch.peer)
                    if request["op"] == "register":
                        registered = request["name"]
                        self._register(registered, ch)
                        await self._reply(ch, {"ok": True})
                        # From now on the agent speaks first on this channel.
                        await self._watch(ch)
                        break
                    ok, out = await self._request(request, ch)
                    reply = {"ok": ok}
                except Exception as e:  # noqa: BLE001 -- the one place a request's failure becomes its reply
                    reply = rpc.error_reply(e, log)
                await self._reply(ch, reply, out)
                close_fds(out)
        if registered and self.vmms.get(registered) is ch:
            del self.vmms[registered]
            log.info("the VMM of %s went away", registered)
        for name in [n for n, holders in self.held.items() if ch in holders]:
            self._unhold(name, ch)  # its `vm start` is done, or its `vm stop` died half-way

    def _register(self, name: str, ch: Channel) -> None:
        ch.replies = trio.open_memory_channel(1)
        self.vmms[name] = ch
        self.registered.set()
        self.registered = trio.Event()
        update = self.update
        if update is not None and update.get("phase") == "restoring" and name in update["vms"] \
                and name not in update["reports"]:
            # A VMM reports the update before it registers: one that registers
            # without a report booted the VM anew (nothing to restore) and
            # never will -- the update must not wait for it.
            self._restored(name, {"name": name, "error": f"{name}: not restored (its VMM started the VM anew)"})

    async def _watch(self, ch: Channel) -> None:
        """Read a registered VMM's channel until it closes (see Channel)."""
        send, _ = ch.replies
        with send:
            while True:
                try:
                    reply, fds = await ch.recv()
                except (OSError, ProtocolError, trio.ClosedResourceError):
                    reply, fds = None, []
                close_fds(fds)
                if reply is None:
                    return
                try:
                    send.send_nowait(reply)
                except trio.WouldBlock:
                    log.warning("a VMM spoke out of turn: %.200s", reply)

    async def _reply(self, ch: Channel, reply: dict, fds=()) -> None:
        await rpc.trio_send(ch.conn, reply, fds)

    def identify(self, sock):
        """The connection's peer (luvmm.peer.Peer), or None if it cannot be identified."""
        try:
            return identify(sock, self.units.unit_of)
        except PermissionError as e:
            log.warning("%s", e.strerror)
            return None

    def authorize(self, request: dict, peer) -> None:
        """Who may ask what (see the module's docstring); EPERM otherwise,
        EINVAL for a request that is not one, or names no valid VM."""
        try:
            schema.check(schema.AGENT, request)
        except ValueError as e:
            raise OSError(errno.EINVAL, str(e)) from None
        op = request["op"]
        if op == "hello":
            return
        if op in NAMED_OPS:
            try:
                check_vm_name(request.get("name"))
            except ValueError as e:
                raise OSError(errno.EINVAL, f"{op}: {e}") from None
        if peer is None or peer is _UNKNOWN:
            raise PermissionError(errno.EPERM, f"{op}: refused to a peer that cannot be identified")
        unit = peer.unit
        own = unit == f"vm-{request.get('name')}"
        if op in VM_OPS and not own:
            raise PermissionError(errno.EPERM, f"{op} of VM {request.get('name')!r}: only its own unit may ask"
                                               + (f" (asked by a process of unit {unit})" if unit else ""))
        if op in OPERATOR_OPS and unit is not None and not (op == "release" and own):
            raise PermissionError(errno.EPERM, f"{op}: refused to a process of unit {unit} "
                                               "(it is the operator's)")

    def _sync_request(self, request: dict):
        op = request["op"]
        if op == "hello":
            return {"pid": os.getpid(), "boot": self.boot, "generation": int(os.environ.get("LUVMM_GENERATION", 0)),
                    "update": self.update}, []
        if op == "create-session":
            name = str(request["name"])
            if not os.path.exists(os.path.join(self.state.path, "units", f"vm-{name}.json")):
                # Stopped for good (`vm stop` removes the unit first, then lets go of
                # its session): a request its VMM sent before it was killed, read
                # only now, must not make the session again -- nobody would let go of it.
                raise OSError(errno.ENOENT, f"no VM {name!r} on this host (stopped)")
            if request.get("fresh") and name in self.outgoing:
                self.outgoing.pop(name).close()  # the last reference: LUO unpreserves its files
            created = name not in self.outgoing
            # "created": a session with nothing in it (this agent never had one for the VM: it was
            # fresh, or an earlier agent's died with it) -- the VMM preserves its files anew.
            return {"created": created}, [os.dup(self._outgoing(name).fd)]
        if op == "retrieve-session":
            session = self._incoming(str(request["name"]))
            return True, [os.dup(session.fd)]
        if op == "resumed":
            return True, []  # a restored VMM's guest runs again (see fast_restore)
        return None

    def _hold(self, name: str, ch: Channel) -> bool:
        """``hold`` (`luvmm vm start` and `vm stop`, before they touch the VM's
        unit): refused (EBUSY) while an update is in progress -- a VMM
        stopped while it prepares or restores leaves its VM half in the
        update (its device and RAM held by a session no one finishes); one
        started then is in no update, and its VMM is killed by the kexec.
        Accepted, no update starts until the VM is released or the client
        goes away."""
        update = self.update
        holders = self.held.get(name, [])
        if ch not in holders and (self.preparing or update is not None and update.get("phase") in _IN_PROGRESS):
            # (This client's already: a `vm start` that failed, stopping its VM.)
            which = f"update {update['id']}, {update['phase']}" if not self.preparing and update else "preparing"
            raise OSError(errno.EBUSY, f"an update is in progress on this host ({which}); try again once it is "
                                       "over (`luvmm update --last` waits for it)")
        if ch not in holders:
            self.held[name] = holders + [ch]
        return True

    def _unhold(self, name: str, ch: Channel) -> None:
        holders = [c for c in self.held.get(name, ()) if c is not ch]
        if holders:
            self.held[name] = holders
        elif self.held.pop(name, None) is not None and self.unheld is not None:
            self.unheld.set()
            self.unheld = trio.Event()

    def _release(self, name: str, ch: Channel) -> dict:
        """``release``: the VM was stopped for good (`luvmm vm stop`).  Let go
        of everything held for it -- its outgoing session (closing the last
        fd of a session unpreserves its files: LUO lets go of its RAM and its
        device), the incoming one (closing a retrieved session finishes it:
        what its VMM did not retrieve is let go), its channel -- so that
        nothing of it stays behind: no session in the next kexec, no device
        kept busy.  (Init flushes the unit's fd store when it stops the unit.)"""
        released = []
        for kind, sessions in (("session", self.outgoing), ("incoming session", self.incoming)):
            session = sessions.pop(name, None)
            if session is not None:
                session.close()
                released.append(kind)
        ch = self.vmms.pop(name, None)
        if ch is not None:
            ch.conn.close()
            released.append("channel")
        self._forget_awaited({name})
        self.reports.pop(name, None)
        self._unhold(name, ch)
        if released:
            log.info("released VM %s: %s", name, ", ".join(released))
        return {"released": released}

    async def _request(self, request: dict, ch: Channel):
        answered = self._sync_request(request)
        if answered is not None:
            return answered
        op = request["op"]
        if op == "hold":
            return self._hold(str(request["name"]), ch), []
        if op == "release":
            return self._release(str(request["name"]), ch), []
        if op == "restored":
            return self._restored(str(request["name"]), request.get("report", {})), []
        if op == "update":
            return await self._update(float(request.get("timeout", self.prepare_timeout))), []
        if op == "result":
            return await self._result(float(request.get("timeout", 60))), []
        if op == "status":
            return {"vmms": sorted(self.vmms), "outgoing": sorted(self.outgoing), "incoming": sorted(self.incoming),
                    "update": self.update}, []
        if op == "abandon":
            return self._abandon(), []
        if op == "check":  # `luvmm host check`: the probe on the LUO fd this agent holds
            from luvmm.liveupdate.check import probe_preservation

            return probe_preservation(self.host, self.luo, request.get("device")), []
        raise ValueError(f"unknown request {op!r}")

    def _abandon(self) -> dict | None:
        """``abandon`` (`luvmm update --abandon`): an update that will not
        finish by itself -- its restored VMMs never all reported -- is
        failed, so that the next one can start.  The VMs are as they are
        (each VMM that restored its VM runs it).  Returns the update."""
        update = self.update
        if update is None or update.get("phase") not in _IN_PROGRESS:
            return update
        if update["phase"] == "restoring":
            for name in sorted(set(update["vms"]) - set(update["reports"])):
                self._restored(name, {"name": name, "error": f"{name}: no report (the update was abandoned)"})
        else:  # kexec or rolling-back, left by an agent that died: the VMs resumed on their own
            update.update(phase="failed", error=update.get("error") or "abandoned")
            self._save_update(update)
        return self.update

    def _outgoing(self, name: str) -> Session:
        session = self.outgoing.get(name)
        if session is None:
            session = self.outgoing[name] = self.luo.create_session(name)
        return session

    def _incoming(self, name: str) -> Session:
        session = self.incoming.get(name)
        if session is None:
            session = self.incoming[name] = self.luo.retrieve_session(name)  # ENOENT if there is none
        return session

    def _restored(self, name: str, report: dict) -> bool:
        self.reports[name] = dict(report, reported_at=time.time())
        if self.update is not None and self.update.get("phase") == "restoring":
            self.update["reports"][name] = self.reports[name]
            if set(self.update["reports"]) >= set(self.update["vms"]):
                errors = [r["error"] for r in self.update["reports"].values() if r.get("error")]
                if errors:
                    self.update.update(phase="failed", errno=errno.EIO, error="; ".join(errors))
                else:
                    self.update["phase"] = "done"
            self._save_update(self.update)
        if self.reported is not None:
            self.reported.set()
            self.reported = trio.Event()
        return True

    # --- updates -------------------------------------------------------------------------------------

    async def _ask(self, name: str, ch: Channel, message: dict, timeout: float) -> dict:
        with trio.move_on_after(timeout) as scope:
            reply = await ch.ask(message)
            if reply is None:
                return {"errno": errno.ECONNRESET, "error": f"{name} went away"}
            return reply
        assert scope.cancelled_caught
        # Its answer may still come, and would be read as the answer to the
        # next request: hang up instead.  A VMM whose agent hangs up resumes
        # its VM if it had prepared it, and registers again.
        if self.vmms.get(name) is ch:
            del self.vmms[name]
        ch.conn.close()
        return {"errno": errno.ETIMEDOUT, "error": f"{name} did not answer in {timeout:.0f} s"}

    def _forget_awaited(self, gone: set[str]) -> None:
        """A restoring update waits for no report of a VM that was stopped,
        nor for any past RESTORE_DEADLINE_S."""
        update = self.update
        if update is not None and update.get("phase") == "restoring":
            late = time.time() - update.get("kexec_started", 0) > RESTORE_DEADLINE_S
            for name in sorted(set(update["vms"]) - set(update["reports"])):
                if name in gone:
                    self._restored(name, {"name": name, "error": f"{name}: stopped during the update"})
                elif late:
                    self._restored(name, {"name": name, "error": f"{name}: no report {RESTORE_DEADLINE_S:.0f} s "
                                                                 "after the kexec: its VMM never restored it"})

    async def _update(self, timeout: float) -> dict:
        # One at a time.  One this agent is preparing or rebooting into is
        # refused at once: waiting would end with this agent, in its kexec.
        if self.preparing or self.update is not None and self.update.get("phase") in ("kexec", "rolling-back"):
            raise OSError(errno.EBUSY, "another live update is in progress on this host"
                          + (f" (update {self.update['id']})" if self.preparing is False else ""))
        self.preparing = True  # from here a `vm start` or `vm stop` is refused
        try:
            # One that has begun goes first: a stop is quick (its VMM killed, its
            # sessions let go), a start lasts until its guest runs.
            with trio.move_on_after(timeout):
                while self.held:
                    await self.unheld.wait()
            if self.held:
                raise OSError(errno.EBUSY, f"VM {', '.join(sorted(self.held))} is being started or stopped")
            return await self._update_one(timeout)
        finally:
            self.preparing = False

    async def _update_one(self, timeout: float) -> dict:
        self._forget_awaited(set((self.update or {}).get("vms", ())) - set(self.state.vm_names()))
        # One the new kernel's agent is finishing (its VMs restoring: e.g. its
        # `luvmm update` was interrupted, the host finishes it) is waited for,
        # within the timeout.
        await self._result(timeout)
        if self.update is not None and self.update.get("phase") in _IN_PROGRESS:
            raise OSError(errno.EBUSY, f"update {self.update['id']} is still in progress")
        # Every VM of the host takes part: wait for the VMMs that init has (re)started to register.
        expected = set(self.state.vm_names())
        if not expected:
            raise OSError(errno.ENOENT, "no VM runs on this host: nothing to update")
        update_id = os.urandom(6).hex()
        with trio.move_on_after(timeout):
            while not expected <= set(self.vmms):
                await self.registered.wait()
        missing = expected - set(self.vmms)
        if missing:
            raise OSError(errno.ETIMEDOUT, f"VMMs not registered with the agent: {', '.join(sorted(missing))}")
        vms = {name: self.vmms[name] for name in sorted(expected)}
        # Two steps, so that one slow VMM (stopped, swapping) cannot hold the
        # others paused: every VMM says it is ready (its files are in its
        # session) while its guest runs on; only then do they all pause and
        # save, each within a short bound.
        ready = await self._ask_all(vms, {"op": "ready", "update": update_id}, timeout)
        failed = {n: r for n, r in ready.items() if "errno" in r}
        if failed:
            detail = "; ".join(f"{n}: {r.get('error')}" for n, r in failed.items())
            raise OSError(next(iter(failed.values()))["errno"], f"not ready, nothing paused: {detail}")
        replies = await self._ask_all(vms, {"op": "prepare", "update": update_id}, min(timeout, PAUSE_TIMEOUT_S))
        failed = {n: r for n, r in replies.items() if "errno" in r}
        update = {"id": update_id, "vms": sorted(vms), "phase": "kexec", "kexec_started": time.time(),
                  "prepared": {n: r.get("ok") for n, r in replies.items()}, "reports": {}}
        try:
            if failed:
                detail = "; ".join(f"{n}: {r.get('error')}" for n, r in failed.items())
                raise OSError(next(iter(failed.values()))["errno"], f"prepare failed, update rolled back: {detail}")
            self._save_update(update, required=True)
        except OSError as e:
            # Anything that fails once a VM is paused: every VM resumes.
            await self._cancel(vms, replies, update_id)
            raise OSError(e.errno, e.strerror if failed else f"{e.strerror}; update rolled back") from None
        self.update = update
        self.nursery.start_soon(self._kexec, update, vms, replies)
        return {"update": update_id, "vms": update["vms"]}

    async def _ask_all(self, vms: dict, message: dict, timeout: float) -> dict[str, dict]:
        replies: dict[str, dict] = {}

        async def ask(name, ch):
            replies[name] = await self._ask(name, ch, message, timeout)

        async with trio.open_nursery() as nursery:
            for name, ch in vms.items():
                nursery.start_soon(ask, name, ch)
        return replies

    async def _cancel(self, vms, replies, update_id) -> None:
        async with trio.open_nursery() as nursery:
            for name, ch in vms.items():
                if "ok" in replies.get(name, {}):
                    nursery.start_soon(self._ask, name, ch, {"op": "cancel", "update": update_id}, 30)

    async def _kexec(self, update, vms, replies) -> None:
        # Let the reply to `update` leave before the reboot kills us.
        await trio.sleep(0)
        try:
            if self.host.kind == "real":
                self._before_reboot(update)
            # Blocking, not in a worker thread: the guests are paused, nothing
            # else is worth serving, and a thread's start is a millisecond of
            # blackout.  The call returns only if the kexec was refused.
            self.host.kexec()
        except OSError as e:
            log.error("kexec failed: %s; resuming the VMs", e)
            # "rolling-back" until every VMM has resumed: whoever waits for
            # the result sees the VMs running again, not a rollback under way.
            update.update(phase="rolling-back", error=f"kexec failed: {e.strerror or e}", errno=e.errno)
            self._save_update(update)
            await self._cancel(vms, replies, update["id"])
            update.update(phase="failed")
            self._save_update(update)
            self.reported.set()
            self.reported = trio.Event()

    def _before_reboot(self, update: dict) -> None:
        """On a real host, just before reboot(LINUX_REBOOT_CMD_KEXEC): mark the
        call (CLOCK_REALTIME and the TSC, with the TSC's rate: the new
        kernel's VMMs time its boot from it -- LUO's freeze and the jump
        happen inside the call, unseen from here) and write everything back
        to disk.  A kexec does not: the page cache
        of the old kernel -- this record, the VMs' definitions -- is lost
        with it (systemctl kexec syncs for the same reason)."""
        from luvmm.liveupdate import tsc

        update["tsc_hz"] = self.tsc_rate.hz() if self.tsc_rate is not None else None
        update["reboot_tsc"] = tsc.mark()
        update["reboot_at"] = update["reboot_tsc"]["realtime"]
        self._save_update(update)
        os.sync()

    async def _result(self, timeout: float) -> dict:
        with trio.move_on_after(timeout):
            while self.update is not None and self.update.get("phase") in _IN_PROGRESS:
                await self.reported.wait()
        return self.update
