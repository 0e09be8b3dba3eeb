"""Raw bytes to the emulated host: the control socket, and one request on an emulated file."""

import os
import socket

from luvmm.wire import REPLY, REQUEST, recv_msg, send_msg


def raw_control(state, data: bytes, fds=()):
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(state.socket)
        send_msg(s, data, list(fds))
        reply, got = recv_msg(s)
        for fd in got:
            os.close(fd)
        return reply


def raw_request(fd: int, data: bytes, fds=()) -> tuple[int, int, bytes, list[int]]:
    """One request on an emulated file, as bytes: (result, errno, payload, fds)."""
    s = socket.socket(fileno=fd)
    try:
        send_msg(s, data, list(fds))
        reply, got = recv_msg(s)
    finally:
        s.detach()
    result, err, tag = REPLY.unpack_from(reply)
    if len(data) >= REQUEST.size:
        assert tag == REQUEST.unpack_from(data)[3]  # each reply names the request it answers
    return result, err, reply[REPLY.size:], got


def raw_file(fd: int, data: bytes, fds=()) -> tuple[int, int]:
    result, err, _, got = raw_request(fd, data, fds)
    for f in got:
        os.close(f)
    return result, err
