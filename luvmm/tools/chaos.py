"""`luvmm bench chaos`: live updates of two VMs while things go wrong.

Each cycle runs one live update and, at a random moment of it, does one of
these (each kind once in the first cycles, in a random order, then at random):

* nothing;
* SIGKILL the agent, or one VMM, or both 0-0.6 s apart (init restarts them:
  the agent from scratch, the VMM on its unit's fd store or its session);
* stall a step of the kernel's live-update path (fault injection);
* fill the state dir's disk for the whole update (where the state dir can
  be a tmpfs of its own: as root).

After each cycle, once every VMM is back, it checks what a user depends on:
every VM is still the same VM -- its guest's counters went on from where they
were, never back, never a cold boot --, no update is left in progress, and
the guest counted no DMA error or corrupted copy.  An update may fail (it is
rolled back); a VM may not be lost.  The run's figures: what was done, what
failed, what was lost (must be nothing), and the blackouts of the updates
that went through.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import threading
import time

from luvmm.liveupdate.agent_client import AgentError, wait_for_agent
from luvmm.liveupdate.update import percentiles, summarize, update_once
from luvmm.liveupdate.emu.client import connect
from luvmm.liveupdate.emu.services import EmulatedUnits
from luvmm.vmm import manage

ACTIONS = ("none", "kill-agent", "kill-vmm", "kill-both", "stall", "full-disk")
VMS = ("chaos0", "chaos1")


class Chaos:
    def __init__(self, state, *, seed: int, disk: str | None):
        self.state = state
        self.rng = random.Random(seed)
        self.disk = disk  # a tmpfs that is the state dir, or None: no full-disk action
        self.schedule: list[str] = []
        self.host = connect(state.socket)
        first = {name: manage.status(state, name) for name in VMS}
        self.seen = {name: st["mailbox"] for name, st in first.items()}  # the guests' counters, last seen
        self.pids = {name: st["pid"] for name, st in first.items()}
        self.result = {"actions": {a: 0 for a in ACTIONS}, "updates_ok": 0, "updates_failed": 0,
                       "vms_lost": [], "counters_went_back": [], "agent_lost": [], "stuck_updates": 0, "guest_dma_errors": 0,
                       "guest_verify_failures": 0, "dma_errors": 0, "dma_lost": 0, "dma_corrupted": 0,
                       "failures": [], "blackouts": []}

    def close(self) -> None:
        self.host.close_connection()

    def units(self) -> dict[str, dict]:
        return {u["name"]: u for u in self.host.call({"op": "units"})[0]}

    def kill(self, unit: str) -> None:
        pid = self.units().get(unit, {}).get("pid")
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cycle(self, n: int) -> str:
        actions = [a for a in ACTIONS if a != "full-disk" or self.disk]
        if n == 1:  # every kind once first (in a random order), then at random
            self.schedule = self.rng.sample(actions, len(actions))
        action = self.schedule.pop(0) if self.schedule else self.rng.choice(actions)
        self.result["actions"][action] += 1
        timers, cleanup = [], []
        at = self.rng.uniform(0, 0.3)
        if action == "kill-agent":
            timers.append(threading.Timer(at, self.kill, ["agent"]))
        elif action == "kill-vmm":
            timers.append(threading.Timer(at, self.kill, [f"vm-{self.rng.choice(VMS)}"]))
        elif action == "kill-both":
            first, second = (["agent", f"vm-{self.rng.choice(VMS)}"] if self.rng.random() < 0.5
                             else [f"vm-{self.rng.choice(VMS)}", "agent"])
            timers.append(threading.Timer(at, self.kill, [first]))
            timers.append(threading.Timer(at + self.rng.uniform(0, 0.6), self.kill, [second]))
        elif action == "stall":
            point = self.rng.choice(("freeze", "retrieve", "finish", "kexec"))
            self.host.call({"op": "faults", "set": f"{point}=stall:{self.rng.uniform(0.05, 0.3):.2f}"})
            cleanup.append(lambda: self.host.call({"op": "faults", "clear": True}))
        elif action == "full-disk":
            filler = os.path.join(self.disk, "chaos-filler")
            _fill(filler)
            cleanup.append(lambda: os.unlink(filler))
        for t in timers:
            t.start()
        try:
            record = update_once(self.state, timeout=30)
            self.result["updates_ok"] += 1
            self._account(record)
            outcome = "ok"
        except (AgentError, OSError) as e:
            self.result["updates_failed"] += 1
            self.result["failures"].append({"cycle": n, "action": action, "error": str(e)[:300]})
            outcome = "failed"
        finally:
            for t in timers:
                t.join()
            for undo in cleanup:
                undo()
        self._settle(n, action)
        return f"cycle {n}: {action}, update {outcome}"

    def _log_tail(self, unit: str, lines: int = 8) -> list[str]:
        """The last lines of a unit's log: what a lost VM's VMM said last."""
        try:
            with open(self.state.logs / f"{unit}.log", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                return f.read().decode(errors="replace").splitlines()[-lines:]
        except OSError as e:
            return [f"(its log: {e.strerror or e})"]

    def _account(self, record: dict) -> None:
        for c in summarize([record])["cycles"]:
            if "error" in c:
                continue
            for k in ("dma_errors", "dma_lost", "dma_corrupted"):
                self.result[k] += c[k] or 0
            self.result["blackouts"].append(c["blackout_s"])

    def _settle(self, n: int, action: str) -> None:
        """Every VM back and whole, and no update left in progress."""
        for name in VMS:
            try:
                st = manage.wait_ready(self.state, name, timeout=60)
            except manage.VmError as e:
                self.result["vms_lost"].append({"cycle": n, "action": action, "vm": name, "why": str(e),
                                                "log": self._log_tail(f"vm-{name}")})
                continue
            mb, before = st["mailbox"], self.seen[name]
            if st["boot"] == "cold" and st["pid"] != self.pids[name]:
                self.result["vms_lost"].append({"cycle": n, "action": action, "vm": name, "why": "booted cold",
                                                "log": self._log_tail(f"vm-{name}", 16)})
            if mb["heartbeat"] < before["heartbeat"] or mb["completed"] < before["completed"]:
                self.result["counters_went_back"].append({"cycle": n, "action": action, "vm": name})
            self.result["guest_dma_errors"] += mb["errors"] - before["errors"]
            self.result["guest_verify_failures"] += mb["verify_failures"] - before["verify_failures"]
            self.seen[name], self.pids[name] = mb, st["pid"]
        try:
            client, hello = wait_for_agent(self.state, 60)
        except OSError as e:
            self.result["agent_lost"].append({"cycle": n, "action": action, "why": str(e)})
            return
        try:
            update = client.call({"op": "result", "timeout": 30})[0] or {}
            if update.get("phase") in ("kexec", "rolling-back", "restoring"):
                self.result["stuck_updates"] += 1
                client.call({"op": "abandon"})
        finally:
            client.close()


def _fill(path: str) -> None:
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise


def _tmpfs_state_dir(path: str) -> bool:
    """Mount a tmpfs on the (empty) state dir, for the full-disk action: root only."""
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", path],
                          capture_output=True).returncode == 0


def run_chaos(*, cycles: int, seed: int | None = None, memory: int = 64 << 20, progress=None) -> dict:
    """``cycles`` live updates of two VMs (firmware guests: a VMM that is
    killed is restarted on its VM) with one random fault each."""
    import shutil
    import tempfile

    from luvmm.liveupdate.emu import hostctl
    from luvmm.liveupdate.state import StateDir
    from luvmm.vmm.config import VmConfig

    seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
    path = tempfile.mkdtemp(prefix="luvmm-chaos-")
    disk = path if _tmpfs_state_dir(path) else None
    state = StateDir(path)
    started = time.monotonic()
    try:
        hostctl.start(state, devices=len(VMS), dsa_bandwidth=48 << 20)
        host = connect(state.socket)
        try:
            for name in VMS:
                manage.start(state, VmConfig(name, memory=memory, guest="firmware"), EmulatedUnits(host))
        finally:
            host.close_connection()
        chaos = Chaos(state, seed=seed, disk=disk)
        try:
            for n in range(1, cycles + 1):
                line = chaos.cycle(n)
                if progress:
                    progress(line)
        finally:
            chaos.close()
        result = chaos.result
    finally:
        hostctl.stop(state)
        if disk:
            subprocess.run(["umount", "-l", path], check=False)
        shutil.rmtree(path, ignore_errors=True)
    blackouts = result.pop("blackouts")
    result.update(cycles=cycles, seed=seed, full_disk=disk is not None, duration_s=round(time.monotonic() - started, 1),
                  blackout_s=percentiles(blackouts), every_vm_survived=not result["vms_lost"]
                  and not result["counters_went_back"])
    return result


def damaged(result: dict) -> bool:
    """What must never happen, whatever the chaos: a VM lost, an update stuck, DMA damaged."""
    return bool(not result["every_vm_survived"] or result["stuck_updates"] or result["agent_lost"]
                or result["guest_dma_errors"]
                or result["guest_verify_failures"] or result["dma_errors"] or result["dma_lost"]
                or result["dma_corrupted"])


def format_chaos(result: dict) -> str:
    b = result["blackout_s"]
    acts = ", ".join(f"{a} {n}" for a, n in result["actions"].items() if n)
    lines = [f"{result['cycles']} cycles (seed {result['seed']}, {result['duration_s']} s): {acts}",
             f"updates: {result['updates_ok']} went through, {result['updates_failed']} failed and were rolled back",
             f"VMs lost: {len(result['vms_lost'])}, counters gone back: {len(result['counters_went_back'])}, "
             f"updates left stuck: {result['stuck_updates']}, agent not back: {len(result['agent_lost'])}",
             f"DMA errors/lost/corrupted in the updates: {result['dma_errors']}/{result['dma_lost']}/"
             f"{result['dma_corrupted']}; the guests counted {result['guest_dma_errors']} errors, "
             f"{result['guest_verify_failures']} corrupted copies",
             f"blackout p50 {b['p50'] * 1e3:.1f} ms, max {b['max'] * 1e3:.1f} ms (updates that went through)"]
    for v in result["vms_lost"][:5]:
        lines.append(f"  LOST: cycle {v['cycle']} ({v['action']}): {v['vm']}: {v['why']}")
        lines += [f"    | {line}" for line in v.get("log", ())]
    return "\n".join(lines)
