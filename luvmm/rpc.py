"""JSON requests and replies over SOCK_SEQPACKET, one code path for every
server and client of luvmm's control sockets: the host daemon's ``host.sock``,
the agent's ``agent.sock``, a VMM's ``vmm.sock`` and its agent channel.

A message is one JSON object (:func:`luvmm.wire.encode_json`), fds by
SCM_RIGHTS.  A reply is ``{"ok": value}`` or ``{"errno": N, "error": why}``
-- the errno envelope.  The rules every server keeps here:

* **every request gets a reply**: :func:`error_reply` turns any exception a
  request raised into one (OSError: its errno; a malformed request: EINVAL;
  anything else: EIO, logged), and :func:`encode` turns a reply that cannot
  be encoded (NaN, say) into EINVAL;
* **replies of any size are delivered**: one longer than :data:`INLINE_MAX`
  travels in a sealed memfd passed with the message (``{"large": N}``), not
  in a datagram the socket would refuse;
* **anything a peer sends gets an answer, not a crash**: a message that is
  truncated, not JSON, nested too deeply or not an object is a ProtocolError
  (:func:`luvmm.wire.decode_json`);
* **every client waits a bounded time** (:func:`call`'s ``timeout``).

Lean on purpose (the restore path uses it): no ``json``, ``socket``, ``logging``.
"""

from __future__ import annotations

import errno
import os
import _socket

from luvmm.schema import check
from luvmm.wire import MAX_FDS, MAX_MESSAGE, ProtocolError, close_fds, decode_json, encode_json, \
    fds_from_ancillary, send_msg

#: A reply longer than this goes in a memfd (a datagram this long fits any socket buffer).
INLINE_MAX = 64 * 1024
#: How long a client waits for a reply unless told otherwise.
DEFAULT_TIMEOUT = 60.0
_CMSG_SPACE = _socket.CMSG_SPACE(MAX_FDS * 4)


class RpcError(OSError):
    """An error reply, or a peer that went away (ECONNRESET) or did not answer (ETIMEDOUT)."""


def error_reply(exc: BaseException, log=None) -> dict:
    """The errno envelope of the exception a request raised."""
    if isinstance(exc, OSError):
        return {"errno": exc.errno or errno.EIO, "error": exc.strerror or str(exc)}
    if isinstance(exc, (ProtocolError, KeyError, TypeError, ValueError, IndexError, AttributeError,
                        OverflowError, RecursionError)):
        return {"errno": errno.EINVAL, "error": f"malformed request: {str(exc)[:200] or type(exc).__name__}"}
    if log is not None:
        log.exception("request failed")
    return {"errno": errno.EIO, "error": f"internal error: {str(exc)[:200]}"}


def encode(reply: dict, fds: list[int] = ()) -> tuple[bytes, list[int], int | None]:
    """(datagram, fds to send, a memfd the caller closes after sending or None).
    Never raises: a reply that is not JSON becomes an EINVAL reply."""
    try:
        data = encode_json(reply)
    except (ValueError, TypeError, RecursionError) as e:
        close_fds(fds)
        return encode_json({"errno": errno.EINVAL, "error": f"the reply cannot be encoded: {e}"}), [], None
    if len(data) <= INLINE_MAX:
        return data, list(fds), None
    memfd = os.memfd_create("luvmm-reply", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(memfd, view):]
    return encode_json({"large": len(data)}), [memfd, *fds], memfd


def decode(data: bytes, fds: list[int]) -> tuple[dict, list[int]]:
    """A message (see :func:`encode`) and the fds that came with it; ProtocolError if malformed."""
    try:
        obj = decode_json(data)
        if set(obj) == {"large"}:
            size = obj["large"]
            if not fds or not isinstance(size, int) or not 0 < size <= 1 << 30:
                raise ProtocolError("a large message without its memfd")
            memfd, fds = fds[0], fds[1:]
            try:
                chunks, done = [], 0
                while done < size:
                    chunk = os.pread(memfd, size - done, done)
                    if not chunk:
                        raise ProtocolError("a large message shorter than it says")
                    chunks.append(chunk)
                    done += len(chunk)
            finally:
                os.close(memfd)
            obj = decode_json(b"".join(chunks))
    except BaseException:
        close_fds(fds)
        raise
    return obj, fds


def recv(sock) -> tuple[dict | None, list[int]]:
    """One message from a blocking socket (None: the peer hung up); ProtocolError if malformed."""
    data, anc, flags, _ = sock.recvmsg(MAX_MESSAGE, _CMSG_SPACE, _socket.MSG_CMSG_CLOEXEC)
    fds = fds_from_ancillary(anc, flags)
    if not data:
        close_fds(fds)
        return None, []
    return decode(data, fds)


def send(sock, obj: dict, fds: list[int] = ()) -> None:
    """Send one message (a reply of any size) on a blocking socket."""
    data, out, memfd = encode(obj, list(fds))
    try:
        send_msg(sock, data, out)
    finally:
        if memfd is not None:
            os.close(memfd)


def call(sock, request: dict, fds: list[int] = (), *, timeout: float | None = DEFAULT_TIMEOUT,
         who: str = "the peer") -> tuple[object, list[int]]:
    """One request on a connected blocking socket: (the reply's "ok", its fds),
    or RpcError with the reply's errno (ECONNRESET: the peer went away,
    ETIMEDOUT: it did not answer within ``timeout`` seconds)."""
    sock.settimeout(timeout)
    try:
        try:
            send(sock, request, fds)
        except (BrokenPipeError, ConnectionResetError):
            pass  # a server that refused the connection said why first: read it
        reply, got = recv(sock)
    except (BrokenPipeError, ConnectionResetError):
        reply, got = None, []
    except TimeoutError:
        raise RpcError(errno.ETIMEDOUT, f"{who} did not answer in {timeout:.0f} s") from None
    finally:
        try:
            sock.settimeout(None)
        except OSError:
            pass
    if reply is None:
        raise RpcError(errno.ECONNRESET, f"{who} went away")
    if "errno" in reply:
        close_fds(got)
        err = reply["errno"] if isinstance(reply["errno"], int) else errno.EIO
        raise RpcError(err, str(reply.get("error") or os.strerror(err)))
    return reply.get("ok"), got


# --- trio servers ------------------------------------------------------------------------------


async def trio_recv(sock) -> tuple[dict | None, list[int]]:
    """:func:`recv` on a trio socket."""
    data, anc, flags, _ = await sock.recvmsg(MAX_MESSAGE, _CMSG_SPACE, _socket.MSG_CMSG_CLOEXEC)
    fds = fds_from_ancillary(anc, flags)
    if not data:
        close_fds(fds)
        return None, []
    return decode(data, fds)


async def trio_send(sock, obj: dict, fds: list[int] = ()) -> bool:
    """:func:`send` on a trio socket; False if the peer is gone."""
    from luvmm.wire import ancillary

    data, out, memfd = encode(obj, list(fds))
    try:
        await sock.sendmsg([data], ancillary(out))
        return True
    except OSError:
        return False
    finally:
        if memfd is not None:
            os.close(memfd)


async def serve_connection(sock, handle, *, schema: dict | None = None, log=None, after=None) -> None:
    """Serve requests on one trio connection until the peer hangs up: each
    request -- however malformed -- gets exactly one reply.  ``handle(request,
    fds)`` is a coroutine returning ``(ok value, fds to send)``; it owns the
    fds it is given.  ``after(request, reply)``, if given, runs once the
    reply is sent (e.g. to stop the server after its "stopping" reply).
    ``schema`` (luvmm.schema): every request is checked against it first."""
    while True:
        try:
            request, fds = await trio_recv(sock)
        except ProtocolError as e:
            await trio_send(sock, error_reply(e))
            continue
        except OSError:
            return
        if request is None:
            return
        out: list[int] = []
        try:
            if not isinstance(request.get("op"), str):
                close_fds(fds)
                raise ProtocolError("a request needs an \"op\"")
            if schema is not None:
                try:
                    check(schema, request)
                except ValueError:
                    close_fds(fds)
                    raise
            ok, out = await handle(request, fds)
            reply = {"ok": ok}
        except Exception as e:  # noqa: BLE001 -- the one place a request's failure becomes its reply
            reply = error_reply(e, log)
        try:
            sent = await trio_send(sock, reply, out)
        finally:
            close_fds(out)
        if after is not None:
            after(request, reply)
        if not sent:
            return


class Listener:
    """A trio accept loop within bounds: ``per_peer`` connections per
    process (EMFILE past it) and ``total`` in all (ENFILE).  When this
    process's fd table is full, a reserved fd is let go to accept the
    connection waiting and tell it why: the socket always answers, and a
    flood never takes the server down.  ``serve(conn)`` runs for each
    connection accepted, in ``nursery``."""

    def __init__(self, *, per_peer: int = 64, total: int = 1024, who: str = "this server"):
        self.per_peer, self.total, self.who = per_peer, total, who
        self.connections: dict[int, int] = {}  # peer pid -> connections open

    async def run(self, listener, serve, nursery) -> None:
        from luvmm.peer import credentials

        reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while True:
                try:
                    conn, _ = await listener.accept()
                except OSError as e:
                    if e.errno not in (errno.EMFILE, errno.ENFILE):
                        raise
                    os.close(reserve)
                    try:
                        conn, _ = await listener.accept()
                        await refuse(conn, e.errno, f"{self.who} has run out of file descriptors")
                    finally:
                        reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                    continue
                pid = credentials(conn)[0]
                if self.connections.get(pid, 0) >= self.per_peer:
                    await refuse(conn, errno.EMFILE, f"at most {self.per_peer} connections per process")
                    continue
                if sum(self.connections.values()) >= self.total:
                    await refuse(conn, errno.ENFILE, f"at most {self.total} connections")
                    continue
                self.connections[pid] = self.connections.get(pid, 0) + 1
                nursery.start_soon(self._serve, serve, conn, pid)
        finally:
            os.close(reserve)

    async def _serve(self, serve, conn, pid: int) -> None:
        try:
            await serve(conn)
        finally:
            left = self.connections.pop(pid, 1) - 1
            if left > 0:
                self.connections[pid] = left


async def refuse(conn, err: int, why: str) -> None:
    """Answer a connection that is not served with why, and close it -- after
    taking what it already sent, or the kernel would reset the connection and
    the peer read ECONNRESET instead of the answer."""
    import struct

    with conn:
        await trio_send(conn, {"errno": err, "error": why})
        raw = _socket.socket(fileno=conn.fileno())
        try:
            while True:
                try:
                    data, anc, flags, _ = raw.recvmsg(1, _CMSG_SPACE, _socket.MSG_DONTWAIT | _socket.MSG_CMSG_CLOEXEC)
                except OSError:
                    break
                for level, kind, payload in anc:
                    if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                        close_fds(struct.unpack(f"{len(payload) // 4}i", payload[:len(payload) // 4 * 4]))
                if not data:
                    break
        finally:
            raw.detach()
