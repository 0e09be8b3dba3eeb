"""Posted writes (OP_PWRITE_POSTED, what the vCPU run loop sends for a
guest's store to a trapped BAR) and the emulated kexec: whatever is queued
on a device's file when the reboot comes reaches the device before the
freeze -- the posted writes, in order, and nothing else (a request that
waits for a reply stays for its file's task)."""

import socket
import struct

from luvmm.liveupdate.emu.daemon import HostDaemon
from luvmm.wire import OP_PREAD, OP_PWRITE_POSTED, REQUEST
from luvmm.vmm.runloop import wire_header


class DeviceFile:
    """A file of the emulated kernel, as HostDaemon serves it: its socket and its pwrite."""

    def __init__(self):
        self.sock, self.client = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.writes = []

    def pwrite(self, data, offset):
        self.writes.append((offset, bytes(data)))
        return len(data)

    def describe(self):
        return "a test's device"


class Kernel:
    def __init__(self, *files):
        self.files = {i: f for i, f in enumerate(files)}


def test_queued_posted_writes_reach_the_device_before_the_freeze_and_nothing_else():
    daemon = object.__new__(HostDaemon)  # its file serving only: no machine, no socket
    dev, other = DeviceFile(), DeviceFile()
    for i in range(3):
        dev.client.send(wire_header(OP_PWRITE_POSTED, 8, 0x1000 + 8 * i) + struct.pack("<Q", i))
    dev.client.send(REQUEST.pack(OP_PREAD, 8, 0x2000, 7))  # waits for its reply: not the freeze's to serve
    dev.client.send(wire_header(OP_PWRITE_POSTED, 8, 0x3000) + bytes(8))  # after it: stays behind it
    HostDaemon._deliver_posted(daemon, Kernel(dev, other))
    assert dev.writes == [(0x1000 + 8 * i, struct.pack("<Q", i)) for i in range(3)]
    assert other.writes == []
    left = dev.sock.recv(4096, socket.MSG_DONTWAIT)
    assert left == REQUEST.pack(OP_PREAD, 8, 0x2000, 7)  # the file's task finds it, and what follows
    for f in (dev, other):
        f.sock.close()
        f.client.close()
