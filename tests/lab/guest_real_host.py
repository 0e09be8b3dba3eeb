"""Runs inside the lab guest at every boot: luvmm on a real LUO kernel, the way
an operator drives it -- its own commands, as processes -- across three real
kexecs.

Stage 1 (the cold boot): `luvmm boot` (the host has no systemd), a VM with
the first edu function passed through (`luvmm vm start --host real`) --
the firmware under the lab guest's nested KVM, its edu driver at CPL 3 --
then
two updates that must roll back and leave the VM as it was -- a kernel
image that does not exist, and a second VM whose VMM refuses prepare --
and the first real update (`luvmm update --host real --kernel ...`), which
kexecs.  Stages 2 and 3: `luvmm boot` restores the VM, `luvmm update --last`
gives the report (``last-N.json``), then the next update.  Stage 4: the last report, and the
VM is stopped.  Each stage writes ``real-host-N.json`` to the shared dir
before it updates; tests/lab/test_lab_real_host.py asserts.

    python -m tests.lab.guest_real_host
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback

from luvmm.lab import guest

VM, REFUSER = "lab-a", "lab-b"
#: The VM's metrics port: `luvmm boot`'s init binds it, and binds it again first after each kexec.
METRICS_PORT = 9109
UPDATES = 3
RUNTIME = "/run/luvmm"
#: What waits for a process gets in the lab: under TCG the guest runs Python a few dozen times slower.
SLOW = 300


def state_dir() -> str:
    return guest.path("state")  # on the shared dir: on disk, it outlives the kexec


def luvmm(*args: str, check: bool = False, timeout: float = 3 * SLOW) -> dict:
    """A `luvmm` command as an operator runs it: its exit status, stdout and stderr."""
    env = dict(os.environ, LUVMM_HOST="real", LUVMM_STATE_DIR=state_dir(), LUVMM_RUNTIME_DIR=RUNTIME)
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "luvmm", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    out = {"argv": list(args), "rc": done.returncode, "stdout": done.stdout[-4000:], "stderr": done.stderr[-4000:],
           "seconds": round(time.time() - started, 3)}
    if check and done.returncode:
        raise RuntimeError(f"luvmm {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return out


def status(name: str = VM) -> dict:
    """The VM's status from its VMM's socket, what `luvmm vm status --json`
    prints (asked in-process: under TCG each command is seconds of Python start-up)."""
    from luvmm.liveupdate.state import StateDir
    from luvmm.vmm import manage

    return manage.status(StateDir.of_host(state_dir(), "real"), name)


def wait_counters(after: dict | None, timeout: float = SLOW) -> dict:
    """The VM's status once its driver completed a few more transfers than ``after``."""
    base = (after or {}).get("mailbox", {}).get("completed", 0)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            st = status()
        except OSError as e:  # between two VMM processes (a restore, a restart)
            last = str(e)
        else:
            if st["mailbox"]["completed"] >= base + 2 and not st.get("prepared"):
                return st
            last = str(st["mailbox"])
        time.sleep(0.2)  # polling another process's guest counters
    raise RuntimeError(f"the guest's transfers did not go on in {timeout} s: {last}")


def kexec_loaded() -> bool:
    from luvmm.liveupdate.kexec import kernel_loaded

    return kernel_loaded()


def guest_kind() -> tuple[str, list]:
    """The firmware under the lab guest's own KVM (nested: SVM emulated by
    QEMU) where it has one, else the synthetic guest; and why."""
    from luvmm.vmm.kvm import kvm_available

    ok, why = kvm_available()
    return ("firmware" if ok else "synthetic"), [ok, why]


def stage1(record: dict) -> None:
    record["boot"] = luvmm("boot", check=True)
    record["guest"], record["kvm"] = guest_kind()
    record["start"] = luvmm("vm", "start", VM, "--device", guest.devices()[0], "--guest", record["guest"],
                            "--memory", "32M", "--timeout", str(SLOW), "--metrics-port", str(METRICS_PORT),
                            check=True)
    record["metrics"] = scrape()
    record["status_started"] = first = wait_counters(None)
    # Rollback 1: an image that does not exist -- refused before anything is paused.
    record["missing_image"] = luvmm("update", "--kernel", "/nonexistent/bzImage")
    record["status_after_missing_image"] = after = wait_counters(first)
    record["loaded_after_missing_image"] = kexec_loaded()
    # Rollback 2: a second VM whose VMM refuses prepare: the kernel was loaded,
    # both VMs were asked, the update rolls back and the kernel is unloaded.
    from luvmm.liveupdate.state import StateDir
    from luvmm.wiring import real_units
    from luvmm.vmm import manage
    from luvmm.vmm.config import VmConfig

    state = StateDir.of_host(state_dir(), "real")
    manage.start(state, VmConfig(REFUSER, memory=32 << 20, device=guest.devices()[1], guest="synthetic"),
                 real_units(state), env={"LUVMM_VMM_FAULT": "refuse-prepare"}, host="real", wait=SLOW)
    record["refused"] = luvmm("update", "--kernel", os.environ["LUVMM_LAB_KERNEL"], "--timeout", str(SLOW))
    record["loaded_after_refusal"] = kexec_loaded()
    record["status_after_refusal"] = wait_counters(after)
    record["refuser_after_refusal"] = status(REFUSER)
    record["stop_refuser"] = luvmm("vm", "stop", REFUSER, check=True)


def later_stage(record: dict) -> None:
    record["boot"] = luvmm("boot", check=True)
    record["last"] = luvmm("update", "--last", "--json", guest.path(f"last-{record['stage']}.json"), "--timeout", str(SLOW))
    record["status"] = wait_counters(None)
    record["metrics"] = scrape()


def scrape() -> dict:
    """The VM's /metrics: how many luvmm_ lines name it, and how many
    updates its blackout histogram counts."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=SLOW) as r:
        text = r.read().decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("luvmm_") and f'vm="{VM}"' in ln]
    counts = [float(ln.rsplit(" ", 1)[1]) for ln in lines if ln.startswith("luvmm_blackout_seconds_count")]
    return {"lines": len(lines), "updates": counts[0] if counts else None}


def main() -> int:
    os.environ.update(LUVMM_RUNTIME_DIR=RUNTIME)  # this script's own calls (manage.start) too
    n = guest.stage()
    record: dict = {"stage": n}
    try:
        stage1(record) if n == 1 else later_stage(record)
        if n <= UPDATES:
            record["update_asked_at"] = time.time()
            guest.save(f"real-host-{n}.json", record)
            os.sync()
            # Does not return when it works: the agent kexecs, this process dies with the old kernel.
            record["update"] = luvmm("update", "--kernel", os.environ["LUVMM_LAB_KERNEL"], "--reuse-cmdline",
                                     "--timeout", str(SLOW))
            record["error"] = f"the update did not kexec: {record['update']['stderr'].strip()[-500:]}"
        else:
            record["stop"] = luvmm("vm", "stop", VM)
            record["boot_stop"] = luvmm("boot", "--stop")
    except Exception:
        record["error"] = traceback.format_exc()
    guest.save(f"real-host-{n}.json", record)
    return 1 if "error" in record else 0


if __name__ == "__main__":
    sys.exit(main())
