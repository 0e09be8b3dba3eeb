"""The VMM's side of the link to its control plane (luvmm.vmm.link): every request
gets one reply -- a malformed one its errno -- and the VMM keeps serving."""

import errno
import socket
import threading

import pytest

from luvmm import rpc
from luvmm.vmm.link import Link


class _Vm:
    """What the requests below touch of a VM: nothing they should not."""

    def __init__(self):
        self.cancelled = 0

    def cancel(self):
        self.cancelled += 1


@pytest.fixture
def link():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lk = Link(_Vm(), None, None, None, "t", None, None, None, "cold")
    lk.sock = ours
    server = threading.Thread(target=lk._serve)
    server.start()
    yield lk, theirs
    theirs.close()
    server.join(10)
    assert not server.is_alive()
    ours.close()


def _errno(sock, request):
    with pytest.raises(rpc.RpcError) as e:
        rpc.call(sock, request, timeout=10)
    return e.value.errno


def test_a_malformed_request_gets_its_errno_and_the_vmm_serves_on(link):
    lk, sock = link
    sock.send(b"{not json")
    reply, _ = rpc.recv(sock)
    assert reply["errno"] == errno.EINVAL
    assert _errno(sock, {"op": "reboot"}) == errno.EINVAL
    assert _errno(sock, {"no": "op"}) == errno.EINVAL
    assert _errno(sock, {"op": "progress"}) == errno.ENOENT  # no restore to verify
    assert _errno(sock, {"op": "finish"}) == errno.ENOENT
    assert _errno(sock, {"op": "prepare"}) == errno.ENOENT  # no outgoing session yet
    assert rpc.call(sock, {"op": "cancel"}, timeout=10)[0] is False  # nothing prepared: nothing resumed
    assert lk.vm.cancelled == 0 and not lk.stopping


def test_stop_is_answered_then_the_vmm_goes(link):
    lk, sock = link
    assert rpc.call(sock, {"op": "stop"}, timeout=10)[0] is True
    assert lk.stopping  # and its server returns (the fixture joins it): the VMM releases the VM and exits
