"""A VM's side of a live update, step by step (docs/live-update.md,
"The VMM and its fd store" and "A live update"):

* :func:`preserve` -- RAM, iommufd (HWPT marked), device and state memfd in
  the VM's LUO session, as soon as the guest runs (LUO takes a file's
  contents at the reboot, not at PRESERVE_FD: the guest runs on);
* :func:`prepare` -- pause, save the machine state (luvmm.vmm.machine_state) into
  the state memfd; :func:`cancel` -- resume as it was (rollback);
* after the kexec, :func:`restore_into` -- retrieve the files, map RAM,
  rebuild KVM and the vCPUs, re-bind and re-attach the device, re-arm
  MSI-X, map its BARs into the guest from the retrieved device fd, resume:
  the guest runs again before anything slow is imported;
* :func:`files` / :func:`leave_files` -- the VM's files for its unit's fd
  store, and :func:`recover_into`: a VMM started after one died picks them up.

The files travel under fixed LUO tokens (the restored VMM asks by number).
"""

from __future__ import annotations

import errno
import os

from luvmm.liveupdate import fdstore
from luvmm.vmm import machine_state
from luvmm.vmm.machine_state import DeviceWiring, GuestState, MachineState, MemoryState, Timestamps
from luvmm.vmm.memory import GuestMemory, sealed_memfd

RAM_TOKEN = 0x10
IOMMUFD_TOKEN = 0x11
DEVICE_TOKEN = 0x12
STATE_TOKEN = 0x13
HWPT_TOKEN = 0x14
TOKENS = {"ram": RAM_TOKEN, "iommufd": IOMMUFD_TOKEN, "device": DEVICE_TOKEN, "state": STATE_TOKEN}
#: What the fd store's meta says it is (it carries DeviceWiring, versioned with the machine state).
META_VERSION = machine_state.VERSION


#: How a kernel says it has no LUO handler for a file (or no HWPT
#: preservation ioctl): liveupdate's file lookup finds no handler (ENOENT),
#: an ioctl it does not know (ENOTTY), an operation it does not support.
NOT_PRESERVABLE = (errno.ENOENT, errno.ENOTTY, errno.EOPNOTSUPP)


def preserve(vm, session) -> None:
    """Make sure the RAM, the iommufd (HWPT marked), the device and the state
    memfd are in the session (what is there already stays).

    The memfds must be: without them nothing of the VM survives, and the
    update is refused.  The device and its iommufd only where the kernel
    can preserve them (the VFIO and iommufd live-update series): on a kernel
    that cannot (mainline 7.2 preserves memfds only) the VM is still kept
    -- its RAM and machine state -- and its device is opened again after
    the kexec, reset (``vm.unpreservable`` says why; the report, that it
    was reset)."""
    if vm.state_memfd < 0:
        vm.state_memfd = sealed_memfd(f"luvmm-{vm.config.name}-state", machine_state.STATE_MEMFD_SIZE)
    dev = vm.device
    for what, token, fd in (("ram", RAM_TOKEN, vm.memory.memfd), ("state", STATE_TOKEN, vm.state_memfd),
                            ("device", DEVICE_TOKEN, dev.dev.fd), ("iommufd", IOMMUFD_TOKEN, dev.iommufd.fd)):
        if what in vm.preserved or what in vm.unpreservable:
            continue
        try:
            if what == "iommufd":
                dev.iommufd.hwpt_liveupdate_mark_preserve(dev.hwpt, HWPT_TOKEN)
            session.preserve_fd(fd, token)
        except OSError as e:
            if what in ("ram", "state") or e.errno not in NOT_PRESERVABLE:
                raise
            # Not retried at every update: the running kernel will not change its mind.
            vm.unpreservable[what] = f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"
            continue
        vm.preserved.add(what)


def device_preserved(vm) -> bool:
    return {"device", "iommufd"} <= vm.preserved


def machine_state_of(vm, timestamps: Timestamps) -> MachineState:
    wiring = vm.device.wiring()
    wiring.preserved = device_preserved(vm)
    return MachineState(vm.guest.save(vm), MemoryState(vm.memory.size), wiring,
                        GuestState(vm.config.to_dict(), vm.device.portal_state(), vm.mailbox.snapshot(),
                                   vm.count_interrupts()), timestamps)


def prepare(vm, session, clock) -> dict:
    """Pause and save the machine state into the state memfd (after making
    sure the files are in the session, which they normally already are).
    Returns the phase marks."""
    clock.mark("prepare")
    preserve(vm, session)
    clock.mark("preserved")
    clock.mark("pause_start")
    clock.mark("stopped", vm.runner.pause())
    mailbox_at_pause = vm.mailbox.snapshot()
    inflight = vm.in_flight()
    vm.guest.paused(vm)  # the gaps it measures in guest RAM start from here
    vm.device.disarm_msix()  # kernels of the reset-on-freeze kind refuse the reboot otherwise
    state = machine_state_of(vm, Timestamps(dict(clock.marks), mailbox_at_pause,
                                            {str(k): v for k, v in inflight.items()},
                                            {"stopped": vm.runner.last_stop_tsc}))  # the pause on the pace ring's clock
    clock.mark("saved", machine_state.write(vm.state_memfd, state))
    return clock.marks


def cancel(vm) -> float:
    """Rollback: the update did not happen; the VM runs on as it was."""
    vm.device.arm_msix()
    return vm.runner.resume()


def retrieve_state(session) -> tuple[int, MachineState]:
    """The state memfd of the session, and the machine state in it."""
    fd = session.retrieve_fd(STATE_TOKEN)
    try:
        return fd, machine_state.read(fd)
    except BaseException:
        os.close(fd)
        raise


def restore_into(vm, session, state_fd: int, state: MachineState, clock) -> None:
    """After a kexec: rebuild ``vm`` (made from the state's config) from its
    session and resume its guest."""
    vm.state_memfd = state_fd
    clock.mark("retrieved")
    vm.memory = GuestMemory(session.retrieve_fd(RAM_TOKEN), vm.config.memory)
    for start, end in vm.guest.working_set(vm):  # its first touches then take KVM's fast path: ~0.5 ms
        vm.memory.populate(start, end)
    clock.mark("mapped")
    vm.vcpus = vm.guest.restore(vm, state.vcpus)
    clock.mark("vcpus_restored")
    vm.device.portal = state.guest.portal_buffers()
    if state.device.preserved:
        vm.device.reattach(session.retrieve_fd(IOMMUFD_TOKEN), session.retrieve_fd(DEVICE_TOKEN), state.device)
    else:
        # The kernel kept the RAM, not the device: open it again and tell the guest's driver it was reset.
        vm.device.rewire(vm.memory, state.device)
        vm.redone = vm.guest.device_reset(vm)
    vm.guest.attach_device(vm)  # its BARs mapped into the guest, the run loops told what traps
    clock.mark("device_reattached")
    # What the device completed while the guest was paused: the transfers in
    # flight at the pause that are done now, before the guest runs (and reaps them).
    inflight = state.timestamps.inflight_at_pause
    vm.completed_while_paused = len(inflight) - vm.still_in_flight(inflight)
    machine_state.mark_resumed(state_fd)
    # Stored before the guest runs: a VMM that dies from here on is started
    # again on them (recover_into), its guest having run on.  Not after the
    # resume: killed in between, it would leave a state that says "resumed"
    # (no second restore from it: it would take the guest back in time) and
    # no files for a restart -- the VM lost (`luvmm bench chaos`, seed 8).
    leave_files(vm, replace=False)  # a kexec flushed the store: nothing of these names to replace
    vm.runner.start(vm.vcpus, vm.step, paused=True)
    clock.mark("resumed", vm.runner.resume())


def files(vm) -> tuple[dict, dict[str, int]]:
    """(meta, {name: fd}) for the unit's fd store: what a VMM started after
    this one dies needs to pick the VM up (:func:`recover_into`)."""
    meta = {"version": META_VERSION, "config": vm.config.to_dict(), "device": vm.device.wiring().to_dict(),
            "preserved": sorted(vm.preserved)}
    return meta, {"ram": vm.memory.memfd, "iommufd": vm.device.iommufd.fd, "device": vm.device.dev.fd,
                  "state": vm.state_memfd}


def leave_files(vm, *, replace: bool = True) -> None:
    """Leave :func:`files` in the unit's fd store: if this VMM dies, init
    starts the next one on them (luvmm.liveupdate.fdstore).  Where there is no
    store (not started by such an init), a VMM that dies loses its VM: said,
    not fatal."""
    meta, fds = files(vm)
    try:
        fdstore.store(fds, meta, replace=replace)
    except OSError as e:
        import sys

        print(f"vmm[{vm.config.name}]: cannot leave the VM's files with init: {e.strerror or e}", file=sys.stderr)


def check_meta(meta: dict) -> None:
    if not isinstance(meta, dict) or meta.get("version") != META_VERSION:
        raise OSError(errno.EINVAL, f"the files stored are of another version ({meta.get('version')!r}, "
                                    f"this VMM reads {META_VERSION})")


def recover_into(vm, meta: dict, fds: dict[str, int], clock) -> None:
    """Start ``vm`` again on the RAM, iommufd and device that a VMM which
    died left in its unit's fd store.  The device kept running, and its DMA
    with it; the guest starts again on the same RAM (Guest.recover)."""
    vm.state_memfd = fds["state"]
    vm.memory = GuestMemory(fds["ram"], vm.config.memory)
    vm.device.adopt(fds["iommufd"], fds["device"], DeviceWiring.from_dict(meta["device"]))
    vm.preserved = set(meta["preserved"])
    vm.vcpus = vm.guest.recover(vm)
    vm.guest.attach_device(vm)
    vm.runner.start(vm.vcpus, vm.step)
    clock.mark("recovered")
