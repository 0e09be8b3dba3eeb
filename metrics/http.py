"""Serving a Prometheus registry over HTTP, inside a trio nursery.

prometheus-client's own server runs a thread per listener; the daemon and
the VMM's control plane are trio programs, and a scrape is one short
request, so a small trio server answers it in the task tree that owns
everything else (cancelled with it, no thread to join).  It speaks enough
HTTP/1.1 for Prometheus, curl and a browser: GET or HEAD of ``/metrics``
(the text format, or OpenMetrics when the scraper asks for it), one request
per connection.
"""

from __future__ import annotations

import functools

import trio

from luvmm import names

MAX_REQUEST = 16 << 10
REQUEST_TIMEOUT = 10.0


def parse_listen(spec: str | int) -> tuple[str, int]:
    """``PORT`` (loopback) or ``ADDRESS:PORT`` -> (address, port)."""
    return names.parse_listen(spec, "metrics address")


async def open_listeners(listen: str | int | None, *, sock=None) -> list[trio.SocketListener]:
    """Listeners on ``sock`` -- a TCP socket already listening (socket
    activation: its unit's init bound it and keeps it; it is served here,
    never bound, nor shut down) -- or else bound now on ``listen``
    (``[ADDRESS:]PORT``).  OSError if it cannot be bound, ValueError if
    ``sock`` is not a listening stream socket."""
    if sock is not None:
        return [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]
    address, port = parse_listen(listen)
    return await trio.open_tcp_listeners(port, host=address)  # SO_REUSEADDR: a VMM started again rebinds


async def serve(registry, listen: str | int | None = None, *, listeners=None,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``registry`` until cancelled, on ``listeners``
    (:func:`open_listeners`) or else on ``listen`` bound now.
    ``task_status`` gets the port served on (``0`` picks a free one)."""
    if listeners is None:
        listeners = await open_listeners(listen)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(functools.partial(_handle, registry), listeners)


async def _read_head(stream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > MAX_REQUEST:
            raise ValueError("request head too large")
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise ValueError("connection closed before the end of the request head")
        data += chunk
    return data


def _response(status: str, content_type: str, body: bytes, head_only: bool) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    return head if head_only else head + body


def respond(registry, head: bytes) -> bytes:
    """The full response to one request head (a pure function: tested directly)."""
    lines = head.decode("latin-1").splitlines()
    parts = lines[0].split() if lines else []
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _response("400 Bad Request", "text/plain", b"bad request line\n", False)
    method, target = parts[0], parts[1]
    head_only = method == "HEAD"
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", "text/plain", b"GET or HEAD\n", False)
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    path = target.split("?", 1)[0]
    if path == "/metrics":
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(headers.get("accept", ""))
        return _response("200 OK", content_type, encoder(registry), head_only)
    if path == "/":
        body = b'<html><body><a href="/metrics">/metrics</a></body></html>\n'
        return _response("200 OK", "text/html; charset=utf-8", body, head_only)
    return _response("404 Not Found", "text/plain", b"not found: try /metrics\n", head_only)


async def _handle(registry, stream) -> None:
    async with stream:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                head = await _read_head(stream)
                await stream.send_all(respond(registry, head))
        except (ValueError, trio.TooSlowError, trio.BrokenResourceError, OSError):
            pass  # a scraper that went away or sent garbage: nothing to answer
