"""The vCPU threads: one per vCPU (KVM_RUN blocks), each running its guest's
step until the VM stops, parking when it is paused.

Pausing is what a live update's blackout starts with: :meth:`Runner.pause`
kicks every vCPU out of KVM_RUN and returns once the last one has parked,
with that moment; :meth:`Runner.resume` lets them run again, and the first
one back marks ``first_run`` (where the blackout ends).  No `threading`: on
the restore path it would cost ~4 ms of imports (Monitor is its Condition,
on _thread alone).
"""

from __future__ import annotations

import time
import _thread

from luvmm.liveupdate.state import pin_vcpu
from luvmm.vmm.runloop import rdtsc


class Monitor:
    """A lock with threading.Condition's notify_all/wait_for, on _thread alone."""

    def __init__(self):
        self._lock = _thread.allocate_lock()
        self._waiters: list = []

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def notify_all(self) -> None:
        """Wake every waiter (the caller holds the lock)."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.release()

    def wait_for(self, predicate, timeout: float | None = None) -> bool:
        """Wait (holding the lock, released meanwhile) until ``predicate()``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not predicate():
            left = -1 if deadline is None else deadline - time.monotonic()
            if deadline is not None and left <= 0:
                return False
            waiter = _thread.allocate_lock()
            waiter.acquire()
            self._waiters.append(waiter)
            self._lock.release()
            try:
                waiter.acquire(True, left)
            finally:
                self._lock.acquire()
                if waiter in self._waiters:  # timed out: nobody will release it
                    self._waiters.remove(waiter)
        return True


class GuestCrash:
    def __init__(self, vcpu: int, reason: str, rip: int = 0):
        self.vcpu, self.reason, self.rip = vcpu, reason, rip


class Runner:
    """The vCPU threads of one VM."""

    def __init__(self):
        self._cond = Monitor()
        self._pause = False
        self._stop = False
        self._parked = 0
        self._threads: list = []  # one lock per vCPU thread, held until it ends
        self.cpus: list = []
        self.last_stop = 0.0
        self.first_run = 0.0
        #: The same two moments on the TSC (what the guest stamps its pace with).
        self.last_stop_tsc = 0
        self.first_run_tsc = 0
        self.crash: GuestCrash | None = None

    def start(self, cpus: list, step, *, paused: bool = False) -> None:
        """A thread per vCPU, each calling ``step(cpu)`` until it returns False
        (the guest stopped: see :meth:`crashed`) or the VM stops.  ``paused``:
        the vCPUs start parked, and run at :meth:`resume`."""
        self.cpus = list(cpus)
        self._pause = paused
        for cpu in self.cpus:
            done = _thread.allocate_lock()
            done.acquire()
            self._threads.append(done)
            _thread.start_new_thread(self._thread_main, (cpu, step, done))

    def _thread_main(self, cpu, step, done) -> None:
        pin_vcpu(cpu.id)
        try:
            while True:
                if (self._pause or self._stop) and not self._park():
                    return
                if not self.first_run:
                    self._ran()  # a thread started after resume() never parks: it is the first to run
                if not step(cpu):
                    return
        finally:
            done.release()

    def _ran(self) -> None:
        with self._cond:
            if not self.first_run and not self._pause:
                self.first_run, self.first_run_tsc = time.time(), rdtsc()
                self._cond.notify_all()  # resume() waits for it

    def _park(self) -> bool:
        """Park this vCPU thread while the VM is paused; False when it must stop."""
        with self._cond:
            if self._stop:
                return False
            if self._pause:
                self._parked += 1
                self.last_stop, self.last_stop_tsc = max(self.last_stop, time.time()), max(self.last_stop_tsc, rdtsc())
                self._cond.notify_all()
                self._cond.wait_for(lambda: not self._pause or self._stop)
                self._parked -= 1
                if self._stop:
                    return False
        return True

    def crashed(self, vcpu_id: int, reason: str, rip: int = 0) -> None:
        """A vCPU's guest stopped for good: it counts as parked from now on."""
        with self._cond:
            self.crash = self.crash or GuestCrash(vcpu_id, reason, rip)
            self._parked += 1
            self._cond.notify_all()

    def pause(self) -> float:
        """Stop every vCPU; returns when the last one has left KVM_RUN (that time)."""
        with self._cond:
            self._pause = True
            self.last_stop, self.last_stop_tsc = 0.0, 0
            for cpu in self.cpus:
                cpu.kick()
            self._cond.wait_for(lambda: self._parked >= len(self.cpus))
        return self.last_stop or time.time()

    #: How long resume() waits for a vCPU thread to run again.
    HANDOFF_S = 0.05

    def resume(self) -> float:
        """Let the vCPUs run again; returns when the first one does (or,
        bounded, when none could).  Waiting is what hands the vCPU threads
        the interpreter lock now: a caller that went on with Python would
        keep it for up to the switch interval (5 ms) before any of them got
        back into the run loop (which lets go of it) -- the guest paused that
        much longer after the VMM said it resumed."""
        with self._cond:
            self.first_run, self.first_run_tsc = 0.0, 0
            self._pause = False
            now = time.time()
            self._cond.notify_all()
            self._cond.wait_for(lambda: self.first_run or self._stop or self.crash or not self.cpus, self.HANDOFF_S)
        return now

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._pause = False
            for cpu in self.cpus:
                cpu.kick()
            self._cond.notify_all()
        for done in self._threads:
            if done.acquire(True, 5):
                done.release()
