"""Typed KVM handles: ``Kvm -> Vm -> Vcpu`` over the host interface.

KVM_RUN is issued from one thread per vCPU through the cffi-called ioctl of
the host interface: cffi releases the GIL for the call and returns EINTR
instead of retrying (``fcntl.ioctl`` retries per PEP 475, so a vCPU in a guest
busy loop could never be kicked out).  A kick is the kernel's own protocol:
set ``kvm_run.immediate_exit`` (covers a vCPU that is about to enter) and send
the vCPU thread a signal whose handler does nothing (covers one that is in the
guest); KVM_RUN then returns with KVM_EXIT_INTR.
"""

from __future__ import annotations

import errno
import os
import _signal as signal  # not `signal`: its enums cost milliseconds on the restore path
import _thread  # not `threading`: 4 ms of imports on the restore path

from luvmm.abi import ffi, new_arg
from luvmm.host import Host, KernelObject, RealHost
from luvmm.uapi.kvm import (
    KVM_API_VERSION,
    KVM_CHECK_EXTENSION,
    KVM_CREATE_IRQCHIP,
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_ENABLE_CAP,
    KVM_EXIT_FAIL_ENTRY,
    KVM_EXIT_HLT,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_MMIO,
    KVM_EXIT_NAMES,
    KVM_EXIT_SHUTDOWN,
    KVM_GET_API_VERSION,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_STATS_FD,
    KVM_GET_SUPPORTED_CPUID,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_IOEVENTFD,
    KVM_IOEVENTFD_FLAG_DATAMATCH,
    KVM_IOEVENTFD_FLAG_PIO,
    KVM_IRQFD,
    KVM_MAX_CPUID_ENTRIES,
    KVM_RUN,
    KVM_SET_CPUID2,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_DEVICE_ATTR,
    KVM_SET_MSRS,
    KVM_VCPU_TSC_CTRL,
    KVM_VCPU_TSC_OFFSET,
    KVM_SET_USER_MEMORY_REGION,
    KVM_STATS_TYPE_CUMULATIVE,
    KVM_STATS_TYPE_MASK,
)

class VcpuExit:
    """Why KVM_RUN returned, as a typed value (kvm-ioctls' ``VcpuExit``): the
    VMM matches on the class, never on a number."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self.__slots__)})"


class Mmio(VcpuExit):
    """KVM_EXIT_MMIO: an access to guest-physical ``addr`` that no memslot backs.
    A read is completed by writing the value into ``data`` before the next KVM_RUN."""

    __slots__ = ("addr", "length", "is_write", "data")

    def __init__(self, addr: int, length: int, is_write: bool, data):
        self.addr, self.length, self.is_write, self.data = addr, length, is_write, data


class Io(VcpuExit):
    """KVM_EXIT_IO: port I/O (``data``: the bytes, in the kvm_run mapping)."""

    __slots__ = ("port", "size", "direction", "count", "data")

    def __init__(self, port: int, size: int, direction: int, count: int, data: memoryview):
        self.port, self.size, self.direction, self.count, self.data = port, size, direction, count, data


class Interrupted(VcpuExit):
    """KVM_EXIT_INTR: kicked (a signal, or immediate_exit): nothing happened to the guest."""

    __slots__ = ()


class Hlt(VcpuExit):
    __slots__ = ()


class Shutdown(VcpuExit):
    """KVM_EXIT_SHUTDOWN: a triple fault."""

    __slots__ = ()


class FailEntry(VcpuExit):
    __slots__ = ("hardware_entry_failure_reason",)

    def __init__(self, reason: int):
        self.hardware_entry_failure_reason = reason


class InternalError(VcpuExit):
    """KVM_EXIT_INTERNAL_ERROR; for an emulation failure with the instruction
    bytes (KVM_CAP_EXIT_ON_EMULATION_FAILURE), ``insn`` holds them."""

    __slots__ = ("suberror", "insn")

    def __init__(self, suberror: int, insn: bytes | None):
        self.suberror, self.insn = suberror, insn


class Unhandled(VcpuExit):
    """An exit reason the VMM does not expect (its KVM_EXIT_ name)."""

    __slots__ = ("reason", "name")

    def __init__(self, reason: int):
        self.reason, self.name = reason, KVM_EXIT_NAMES.get(reason, str(reason))


#: The signal that kicks a vCPU thread out of KVM_RUN (QEMU's SIG_IPI).
SIG_VCPU_KICK = signal.SIGUSR1


def install_kick_handler() -> None:
    """Install the no-op handler that makes SIG_VCPU_KICK interrupt KVM_RUN.

    Python only lets the main thread install handlers: elsewhere this does
    nothing, and the main thread must have called it.  Without a handler the
    signal's default action would kill the process.
    """
    if signal.getsignal(SIG_VCPU_KICK) in (signal.SIG_DFL, signal.SIG_IGN, None):
        try:
            signal.signal(SIG_VCPU_KICK, _kick_handler)
        except ValueError:  # not the main thread
            pass


def _kick_handler(signum, frame) -> None:
    """Nothing to do: the signal's only job is to make KVM_RUN return EINTR."""


class Kvm(KernelObject):
    """/dev/kvm."""

    def __init__(self, host: Host | None = None, path: str = "/dev/kvm"):
        host = host or RealHost()
        super().__init__(host, host.open(path))
        version = self.api_version()
        if version != KVM_API_VERSION:
            self.close()
            raise OSError(f"KVM API version {version}, expected {KVM_API_VERSION}")
        install_kick_handler()

    def api_version(self) -> int:
        return self.ioctl(KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        return self.ioctl(KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return self.ioctl(KVM_GET_VCPU_MMAP_SIZE)

    def create_vm(self, vm_type: int = 0) -> Vm:
        return Vm(self, self.ioctl(KVM_CREATE_VM, vm_type))

    def get_supported_cpuid(self) -> bytearray:
        """KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can give a guest, as the
        bytes of a ``struct kvm_cpuid2`` (nent, then nent entries) -- what
        :meth:`Vcpu.set_cpuid2` takes.  Asked once per handle; E2BIG means the
        room was too small, so ask again with more (up to KVM_MAX_CPUID_ENTRIES)."""
        if getattr(self, "_supported_cpuid", None) is None:
            room = 64
            while True:
                buf = bytearray(ffi.sizeof("struct kvm_cpuid2") + room * ffi.sizeof("struct kvm_cpuid_entry2"))
                ffi.from_buffer("struct kvm_cpuid2 *", buf).nent = room
                try:
                    self.host.ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, buf)
                except OSError as e:
                    if e.errno == errno.E2BIG and room < KVM_MAX_CPUID_ENTRIES:
                        room = min(room * 2, KVM_MAX_CPUID_ENTRIES)
                        continue
                    raise
                nent = ffi.from_buffer("struct kvm_cpuid2 *", buf).nent
                self._supported_cpuid = buf[:ffi.sizeof("struct kvm_cpuid2")
                                            + nent * ffi.sizeof("struct kvm_cpuid_entry2")]
                break
        return bytearray(self._supported_cpuid)


class Vm(KernelObject):
    """A KVM virtual machine (the fd KVM_CREATE_VM returned)."""

    def __init__(self, kvm: Kvm, fd: int):
        super().__init__(kvm.host, fd)
        self.kvm = kvm

    def check_extension(self, cap: int) -> int:
        return self.ioctl(KVM_CHECK_EXTENSION, cap)

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        self.ioctl(KVM_SET_USER_MEMORY_REGION, new_arg(
            "struct kvm_userspace_memory_region", slot=slot, flags=flags,
            guest_phys_addr=guest_phys_addr, memory_size=memory_size, userspace_addr=userspace_addr))

    def create_irqchip(self) -> None:
        self.ioctl(KVM_CREATE_IRQCHIP)

    def irqfd(self, fd: int, gsi: int, flags: int = 0) -> None:
        self.ioctl(KVM_IRQFD, new_arg("struct kvm_irqfd", fd=fd, gsi=gsi, flags=flags))

    def ioeventfd(self, fd: int, addr: int, length: int, *, datamatch: int | None = None,
                  pio: bool = False, flags: int = 0) -> None:
        flags |= KVM_IOEVENTFD_FLAG_PIO if pio else 0
        if datamatch is not None:
            flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
        self.ioctl(KVM_IOEVENTFD, new_arg("struct kvm_ioeventfd", fd=fd, addr=addr, len=length,
                                          datamatch=datamatch or 0, flags=flags))

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        self.ioctl(KVM_ENABLE_CAP, new_arg("struct kvm_enable_cap", cap=cap, flags=flags,
                                           args=list(args) + [0] * (4 - len(args))))

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        return Vcpu(self, vcpu_id, self.ioctl(KVM_CREATE_VCPU, vcpu_id))


class Vcpu(KernelObject):
    """A vCPU: its fd, its mmapped ``struct kvm_run``, and the thread running it."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: int):
        super().__init__(vm.host, fd)
        self.vm = vm
        self.id = vcpu_id
        self._run_map = self.host.mmap(fd, vm.kvm.vcpu_mmap_size())
        #: The shared ``struct kvm_run`` (exit information, immediate_exit).
        self.kvm_run = ffi.from_buffer("struct kvm_run *", self._run_map)
        # The thread inside run(), guarded so that kick() never signals a
        # thread id that has already gone away.
        self._thread_lock = _thread.allocate_lock()
        self._thread_id: int | None = None
        #: The ``struct kvm_cpuid2`` bytes last given to KVM_SET_CPUID2 (the
        #: kernel has KVM_GET_CPUID2 too; keeping them spares a syscall).
        self.cpuid = b""
        #: The VMM's run loop for this vCPU (luvmm.vmm.runloop.RunLoop), once it runs it in C.
        self.loop = None
        self._stats = None  # (stats fd, data offset, [(name, offset)]), once asked

    @property
    def kvm_run_addr(self) -> int:
        """Where this process mapped the vCPU's ``struct kvm_run``."""
        return int(ffi.cast("uintptr_t", self.kvm_run))

    def run(self, loop=None) -> int:
        """KVM_RUN once -- or, given the VMM's run ``loop`` (luvmm.vmm.runloop),
        as many times as the loop serves the exits itself; returns
        ``kvm_run.exit_reason`` (a loop may return its own codes too).

        A kick returns KVM_EXIT_INTR (the kernel's own exit reason for a
        signal) with immediate_exit cleared, ready for the next entry.
        """
        with self._thread_lock:
            self._thread_id = _thread.get_ident()
        try:
            if loop is not None:
                return loop.run()
            self.host.ioctl(self.fd, KVM_RUN, 0)
        except InterruptedError:
            self.kvm_run.immediate_exit = 0
            return KVM_EXIT_INTR
        finally:
            with self._thread_lock:
                self._thread_id = None
        return self.kvm_run.exit_reason

    def run_exit(self) -> VcpuExit:
        """KVM_RUN once; why it returned, as a typed :class:`VcpuExit`."""
        return self.exit_of(self.run())

    def exit_of(self, reason: int) -> VcpuExit:
        """The exit KVM_RUN returned with ``reason``, typed (read from kvm_run)."""
        run = self.kvm_run
        if reason == KVM_EXIT_MMIO:
            mmio = run.mmio
            return Mmio(mmio.phys_addr, mmio.len, bool(mmio.is_write), mmio.data)
        if reason == KVM_EXIT_INTR:
            return Interrupted()
        if reason == KVM_EXIT_IO:
            io = run.io
            return Io(io.port, io.size, io.direction, io.count, self.io_data())
        if reason == KVM_EXIT_INTERNAL_ERROR:
            failure = run.emulation_failure
            insn = None
            if failure.suberror == KVM_INTERNAL_ERROR_EMULATION and \
                    failure.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
                insn = bytes(failure.insn_bytes)[:failure.insn_size]
            return InternalError(failure.suberror, insn)
        if reason == KVM_EXIT_HLT:
            return Hlt()
        if reason == KVM_EXIT_SHUTDOWN:
            return Shutdown()
        if reason == KVM_EXIT_FAIL_ENTRY:
            return FailEntry(run.fail_entry.hardware_entry_failure_reason)
        return Unhandled(reason)

    def kick(self) -> None:
        """Make this vCPU leave KVM_RUN, or not enter it next time (any thread)."""
        if signal.getsignal(SIG_VCPU_KICK) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise RuntimeError("install_kick_handler() was not called from the main thread")
        self.kvm_run.immediate_exit = 1
        with self._thread_lock:
            if self._thread_id is not None:
                signal.pthread_kill(self._thread_id, SIG_VCPU_KICK)

    def set_cpuid2(self, cpuid: bytearray) -> None:
        """KVM_SET_CPUID2 with the bytes of a ``struct kvm_cpuid2`` and its entries.
        The guest's CPUID is what KVM checks EFER, CR4 and CR3 against: without
        one, standard KVM refuses long mode (KVM_SET_SREGS: EINVAL)."""
        self.host.ioctl(self.fd, KVM_SET_CPUID2, cpuid)
        self.cpuid = bytes(cpuid)

    def get_regs(self):
        regs = ffi.new("struct kvm_regs *")
        self.ioctl(KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs) -> None:
        self.ioctl(KVM_SET_REGS, regs)

    def get_sregs(self):
        sregs = ffi.new("struct kvm_sregs *")
        self.ioctl(KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs) -> None:
        self.ioctl(KVM_SET_SREGS, sregs)

    def set_tsc_offset(self, offset: int) -> None:
        """KVM_SET_DEVICE_ATTR KVM_VCPU_TSC_CTRL/KVM_VCPU_TSC_OFFSET: the
        guest's TSC is the host's plus ``offset`` (two's complement).  Unlike
        a write of MSR_IA32_TSC, which KVM turns into an offset through its
        view of the TSC's scaling, this is the offset the CPU applies: ENXIO
        where KVM has no such attribute."""
        value = ffi.new("uint64_t *", offset & (1 << 64) - 1)
        attr = ffi.new("struct kvm_device_attr *", {"group": KVM_VCPU_TSC_CTRL, "attr": KVM_VCPU_TSC_OFFSET,
                                                     "addr": int(ffi.cast("uintptr_t", value))})
        self.ioctl(KVM_SET_DEVICE_ATTR, attr)

    def set_msrs(self, values: dict[int, int]) -> None:
        """KVM_SET_MSRS: each MSR index to its value.  The kernel returns how
        many it set and stops at the first it refuses: fewer is an error here,
        with the refused index (EINVAL, as the kernel's own MSR checks say)."""
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(values),
                                              "entries": [{"index": i, "data": v} for i, v in values.items()]})
        done = self.ioctl(KVM_SET_MSRS, msrs)
        if done != len(values):
            raise OSError(errno.EINVAL, f"KVM_SET_MSRS: MSR {list(values)[done]:#x} refused")

    def open_stats(self) -> None:
        """KVM_GET_STATS_FD: this vCPU's binary stats file (Documentation/
        virt/kvm/api.rst).  Before the vCPU runs: every vCPU ioctl takes the
        vCPU's mutex, which KVM_RUN holds for as long as the guest runs
        without an exit -- asked of a running vCPU, it would wait for the
        next exit (forever, for a guest in a loop with none).  Reading the
        file takes no lock: its descriptors are read at the first
        :meth:`stats`, not on the restore's path."""
        if self._stats is None:
            self._stats = (self.ioctl(KVM_GET_STATS_FD), None, None)

    def _stats_layout(self, fd: int) -> tuple[int, list[tuple[str, int]]]:
        header = ffi.new("struct kvm_stats_header *")
        ffi.memmove(header, os.pread(fd, ffi.sizeof(header[0]), 0), ffi.sizeof(header[0]))
        step = ffi.sizeof("struct kvm_stats_desc") + header.name_size
        raw = os.pread(fd, step * header.num_desc, header.desc_offset)
        fields = []
        for i in range(header.num_desc):
            desc = ffi.from_buffer("struct kvm_stats_desc *", raw[i * step:(i + 1) * step])
            if desc.flags & KVM_STATS_TYPE_MASK == KVM_STATS_TYPE_CUMULATIVE and desc.size == 1:
                name = raw[i * step + ffi.sizeof("struct kvm_stats_desc"):(i + 1) * step]
                fields.append((name.split(b"\0", 1)[0].decode(), desc.offset))
        return header.data_offset, fields

    def stats(self) -> dict[str, int]:
        """KVM's own statistics of this vCPU, the cumulative counters by
        KVM's names -- ``exits``, ``mmio_exits``, ``io_exits``,
        ``signal_exits``, ``halt_exits``, ``insn_emulation``...; {} where
        :meth:`open_stats` was not called (or KVM has no binary stats)."""
        if self._stats is None:
            return {}
        fd, base, fields = self._stats
        if fields is None:
            base, fields = self._stats_layout(fd)
            self._stats = (fd, base, fields)
        size = max(offset for _, offset in fields) + 8 if fields else 0
        data = os.pread(fd, size, base)
        return {name: int.from_bytes(data[offset:offset + 8], "little") for name, offset in fields}

    def io_data(self) -> memoryview:
        """The data bytes of a KVM_EXIT_IO (inside the kvm_run mapping)."""
        io = self.kvm_run.io
        return memoryview(self._run_map)[io.data_offset:io.data_offset + io.size * io.count]

    def close(self) -> None:
        if self._stats is not None:
            os.close(self._stats[0])
            self._stats = None
        if self.kvm_run is not None:
            ffi.release(self.kvm_run)  # drop the buffer export before unmapping
            self.kvm_run = None
        self._run_map.close()
        super().close()


def kvm_available(path: str = "/dev/kvm") -> tuple[bool, str]:
    """Whether KVM can be used here, and if not, why (for skips and fallbacks)."""
    if not os.path.exists(path):
        return False, f"{path} does not exist (no KVM on this machine)"
    if not os.access(path, os.R_OK | os.W_OK):
        return False, f"{path} is not readable and writable by this user"
    try:
        Kvm(path=path).close()
    except OSError as e:
        return False, f"{path} cannot be used: {e}"
    return True, ""
