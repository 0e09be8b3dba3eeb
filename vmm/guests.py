"""What a VM runs -- one contract, two guests:

* :class:`FirmwareGuest`: the guest firmware (vmm/firmware) under KVM, its
  work loop at CPL 3, one KVM vCPU per vCPU; it drives a DSA or QEMU's edu;
* :class:`SyntheticGuest`: the same DMA workload driven from the host side
  (vmm/synthetic.py), for machines without a usable /dev/kvm.

A guest boots its vCPUs (``boot``), is given its device once both are there
(``attach_device``: BARs mapped into the guest, the run loops told what
traps), runs one turn of a vCPU (``step``: False when the vCPU stopped for
good), saves and restores their state as machine
state sections (``save``, ``restore``), and -- if it keeps what it knows in
guest RAM, as the firmware does -- starts again on the same RAM and device
after its VMM died (``recover``).  The VMM never asks which class a vCPU is.
"""

from __future__ import annotations

import errno
import os

from luvmm.abi import ffi
from luvmm.vmm import guest
from luvmm.vmm.guest import EduRecord
from luvmm.vmm.kvm import FailEntry, Hlt, InternalError, Interrupted, Io, Kvm, Mmio, Shutdown, Unhandled
from luvmm.vmm.machine_state import VcpuState
from luvmm.uapi.kvm import KVM_CAP_EXIT_ON_EMULATION_FAILURE
from luvmm.vmm.runloop import EXIT_DEVICE_ERROR
from luvmm.vmm.x86 import MSR_IA32_TSC, identity_page_tables, page_table_bytes, setup_cpuid, setup_long_mode, user_rflags


class Guest:
    kind = ""
    #: Whether a VMM started after one died can run it again on the same RAM and device.
    restartable = False
    #: The clock an edu driver's stamps in guest RAM are taken on (luvmm.vmm.guest.EduRecord):
    #: "realtime" (the host's CLOCK_REALTIME, which a kexec does not carry faithfully) or "tsc".
    stamps = "realtime"

    def boot(self, vm) -> list:
        raise NotImplementedError

    def attach_device(self, vm) -> None:
        """The VM's device is wired and its vCPUs exist: connect the two."""

    def working_set(self, vm) -> list[tuple[int, int]]:
        """The GPA ranges the guest touches as it runs (none: [])."""
        return []

    def step(self, vm, cpu) -> bool:
        raise NotImplementedError

    def save(self, vm) -> list[VcpuState]:
        raise NotImplementedError

    def restore(self, vm, states: list[VcpuState]) -> list:
        raise NotImplementedError

    def paused(self, vm) -> None:
        """The VMM paused the guest for an update (a guest that measures its gaps in RAM starts anew)."""

    def device_reset(self, vm) -> int:
        """After a restore, the device came back reset: the guest's driver is
        told (reset_done).  Returns how many transfers it will do again."""
        return 0

    def recover(self, vm) -> list:
        raise OSError(errno.EOPNOTSUPP, f"the {self.kind} guest keeps its state in the VMM: "
                                        "it cannot be restarted on its RAM")


class FirmwareGuest(Guest):
    kind = "firmware"
    restartable = True
    stamps = "tsc"

    @staticmethod
    def _sync_tsc(vm, vcpus) -> None:
        """Every vCPU's TSC set to the host's, at boot and again on the new
        vCPUs after a live update: the firmware stamps its heartbeat and its
        completions from RDTSC, and a new vCPU's TSC would start again at
        zero -- on the host's, which a kexec does not reset, the gap across
        the update is the real one.  By the offset (KVM_VCPU_TSC_OFFSET 0),
        not by writing MSR_IA32_TSC: KVM turns such a write into an offset
        through its TSC scaling ratio, which it leaves at 0 when its default
        rate is below the TSC's and the CPU cannot scale (kvm_set_tsc_khz
        fails before it sets one: "user requested TSC rate below hardware
        speed", seen in the lab's nested KVM after the TSC's calibration was
        refined upwards), and the guest's TSC is then the host's *plus* the
        value written.  The MSR only where KVM has no such attribute; a KVM
        that refuses both leaves the stamps off (tsc_mult 0: not measured)
        rather than the guest."""
        try:
            for vcpu in vcpus:
                try:
                    vcpu.set_tsc_offset(0)
                except OSError as e:
                    if e.errno not in (errno.ENXIO, errno.ENOTTY, errno.EINVAL):
                        raise
                    from luvmm.liveupdate import tsc  # not on the restore path where KVM has the attribute

                    now = tsc.read()
                    if now is None:
                        raise OSError(errno.EOPNOTSUPP, "no TSC to read") from e
                    vcpu.set_msrs({MSR_IA32_TSC: now})
        except OSError:
            vm.mailbox["tsc_mult"] = 0

    def _create_kvm(self, vm, states: list[VcpuState] = ()) -> list:
        vm.kvm = Kvm(vm.host)
        vm.vmfd = vm.kvm.create_vm()
        if vm.vmfd.check_extension(KVM_CAP_EXIT_ON_EMULATION_FAILURE):
            # Emulation failures come with the instruction bytes (MOVDIR64B).
            vm.vmfd.enable_cap(KVM_CAP_EXIT_ON_EMULATION_FAILURE, 1)
        vm.memory.map_into_kvm(vm.vmfd)
        vcpus = [vm.vmfd.create_vcpu(i) for i in range(vm.config.vcpus)]
        saved = {state.id: state.cpuid for state in states if state.cpuid}
        for vcpu in vcpus:
            # Before any KVM_SET_SREGS: standard KVM checks long mode against it.
            if vcpu.id in saved:
                vcpu.set_cpuid2(bytearray(saved[vcpu.id]))  # the CPU the guest booted on
            else:
                setup_cpuid(vcpu)
        return vcpus

    def boot(self, vm) -> list:
        """vCPUs at the firmware's entry: long mode, CPL 3, identity-mapped low 4 GiB."""
        vcpus = self._create_kvm(vm)
        # The firmware touches only low RAM (its DMA area is below 3 GiB) and
        # the MMIO hole: map [0, 4 GiB), which leaves the tables below the
        # mailbox whatever the RAM size.  RAM above 4 GiB is the device's
        # (through the IOMMU, IOVA = GPA), not the firmware's.
        top = guest.MMIO_END
        assert guest.PAGE_TABLES_GPA + page_table_bytes(top) <= guest.MAILBOX_GPA
        cr3 = identity_page_tables(vm.view, guest.PAGE_TABLES_GPA, top,
                                   uncached=((guest.MMIO_START, guest.MMIO_END),))
        for vcpu in vcpus:
            sregs = vcpu.get_sregs()
            setup_long_mode(sregs, cr3, cpl=3)
            vcpu.set_sregs(sregs)
            regs = vcpu.get_regs()
            regs.rip, regs.rflags = guest.FIRMWARE_GPA, user_rflags()
            regs.rsp = guest.STACK_TOP - 0x10000 * vcpu.id - 8
            regs.rdi = vcpu.id
            vcpu.set_regs(regs)
        if not vm.mailbox["tsc_mult"]:
            from luvmm.liveupdate import tsc  # a cold boot's: the restore path finds it in guest RAM

            # Both drivers keep the pace ring from the TSC; edu's stamps its gaps too.
            vm.mailbox["tsc_mult"] = guest.tsc_mult(tsc.hz())
            vm.mailbox["pace_period_ns"] = guest.PACE_PERIOD_NS
        self._sync_tsc(vm, vcpus)
        return vcpus

    def working_set(self, vm) -> list[tuple[int, int]]:
        if vm.device.kind == "edu":  # its record and buffers sit at DMA_BASE, in the first range
            return guest.working_set(0, 0, 0)
        cfg = vm.config
        return guest.working_set(cfg.slots, cfg.pairs, cfg.xfer)

    def attach_device(self, vm) -> None:
        """The device's mappable BAR areas into the guest as KVM memory slots
        (no exit for them), and a run loop in C per vCPU for the rest: the
        trapped BAR ranges, the wait-for-interrupt port (the firmware's
        driver has no interrupt handler: the loop waits on the device's
        eventfd for it), with a write-combining buffer saved at the pause."""
        from luvmm.vmm.runloop import RunLoop

        vm.device.map_bars(vm.vmfd)
        ram = [(gpa, length, vm.memory.addr + off) for gpa, off, length in vm.memory.ranges()]
        loops = []
        for vcpu in vm.vcpus:
            loop = RunLoop(vcpu.fd, vcpu.kvm_run_addr)
            loop.configure(vm.device.traps(), irq_fd=vm.device.irq_fd(), wait_port=guest.LUVMM_PORT_WAIT_IRQ,
                           wait_s=guest.IRQ_WAIT_S, ram=ram)
            held = vm.device.portal.pop(vcpu.id, None)
            if held is not None:
                loop.set_portal_state(*held)
            vcpu.loop = loop
            try:
                vcpu.open_stats()  # now: once the vCPU runs, its ioctls wait for its exits
            except OSError:
                pass  # a KVM without binary stats: the run loop's counts still say where the exits go
            loops.append(loop)
        vm.device.loops = loops

    def step(self, vm, cpu) -> bool:
        """One return of the vCPU's run loop: only what the loop left to the
        VMM -- a kick, the MSI-X table, an access outside the BARs, the end
        of the guest (an emulation failure the loop could not serve, as a
        MOVDIR64B it does, is one)."""
        try:
            reason = cpu.run(cpu.loop)
        except OSError as e:
            return vm.crashed(cpu, f"KVM_RUN failed: {e}")
        if reason < 0:
            return vm.crashed(cpu, f"KVM_RUN failed: {os.strerror(-reason)}")
        if reason == EXIT_DEVICE_ERROR:
            return vm.crashed(cpu, f"device access failed: {os.strerror(cpu.loop.error)}")
        exit = cpu.exit_of(reason)
        if isinstance(exit, Mmio):
            vm.device.mmio(cpu.id, exit.addr, exit.length, exit.is_write, exit.data)
            return True
        if isinstance(exit, Io):
            return True  # the loop serves port I/O; none is left for here
        if isinstance(exit, Interrupted):
            return True  # a kick
        reason = {Hlt: "KVM_EXIT_HLT", Shutdown: "KVM_EXIT_SHUTDOWN", FailEntry: "KVM_EXIT_FAIL_ENTRY",
                  InternalError: "KVM_EXIT_INTERNAL_ERROR"}.get(type(exit))
        if reason is None:
            reason = f"unexpected exit {exit.name if isinstance(exit, Unhandled) else exit}"
        return vm.crashed(cpu, reason)

    def save(self, vm) -> list[VcpuState]:
        return [VcpuState(v.id, bytes(ffi.buffer(v.get_regs())), bytes(ffi.buffer(v.get_sregs())), cpuid=v.cpuid)
                for v in vm.vcpus]

    def restore(self, vm, states: list[VcpuState]) -> list:
        vcpus = self._create_kvm(vm, states)
        for vcpu, saved in zip(vcpus, states):
            sregs = ffi.new("struct kvm_sregs *")
            ffi.memmove(sregs, saved.sregs, ffi.sizeof(sregs[0]))
            vcpu.set_sregs(sregs)
            regs = ffi.new("struct kvm_regs *")
            ffi.memmove(regs, saved.regs, ffi.sizeof(regs[0]))
            vcpu.set_regs(regs)
        self._sync_tsc(vm, vcpus)
        return vcpus

    def paused(self, vm) -> None:
        if vm.device.kind == "edu":  # the DSA's DMA area holds batch records there
            record = EduRecord(vm.view)
            record["max_heartbeat_gap_ns"] = record["max_completion_gap_ns"] = 0

    def device_reset(self, vm) -> int:
        """edu's driver (fw.c) is told through the mailbox: it does the
        transfer under way again from its start, and counts it in redone."""
        if vm.device.kind != "edu":
            return 0
        vm.mailbox["device_resets"] = vm.mailbox["device_resets"] + 1
        return int(EduRecord(vm.view)["phase"] != guest.EDU_IDLE)

    def recover(self, vm) -> list:
        """The vCPUs' registers died with the VMM: vCPU 0 enters the firmware
        at _start again with init_device = 0, and the firmware recovers from
        what it keeps in guest RAM (vmm/firmware/fw.c)."""
        vm.mailbox["init_device"] = 0
        return self.boot(vm)

    def rip(self, cpu) -> int:
        try:
            return cpu.get_regs().rip
        except OSError:
            return 0


class SyntheticGuest(Guest):
    kind = "synthetic"

    def boot(self, vm, driver: str | None = None) -> list:
        """vCPU 0 as the driver of the VM's device: the DSA's, or edu's (vmm/synthetic_edu.py)."""
        if (driver or vm.device.kind) == "edu":
            from luvmm.vmm.synthetic_edu import SyntheticEduCpu

            return [SyntheticEduCpu(vm)]
        from luvmm.vmm.synthetic import SyntheticCpu  # only for synthetic guests

        return [SyntheticCpu(vm)]

    def step(self, vm, cpu) -> bool:
        try:
            cpu.step()
        except OSError as e:
            return vm.crashed(cpu, f"device access failed: {e}")
        return True

    def save(self, vm) -> list[VcpuState]:
        return [VcpuState(cpu.id, synthetic=cpu.save()) for cpu in vm.vcpus]

    def restore(self, vm, states: list[VcpuState]) -> list:
        # Before the device is back: the saved registers say which driver they are.
        (cpu,) = self.boot(vm, states[0].synthetic.get("driver", "dsa"))
        cpu.restore(states[0].synthetic)
        return [cpu]

    def paused(self, vm) -> None:
        vm.vcpus[0].paused()

    def device_reset(self, vm) -> int:
        return vm.vcpus[0].device_reset()

    def rip(self, cpu) -> int:
        return 0


def guest_for(kind: str) -> Guest:
    return {"firmware": FirmwareGuest, "synthetic": SyntheticGuest}[kind]()
