"""Runs inside the lab guest: the firmware guest on the lab's standard (nested)
KVM.  An emulated host (its DSA, its LUO agent) in the lab guest, a VM whose
firmware drives the DSA from CPL 3 under the guest's /dev/kvm; its heartbeat
and DMA counters must advance, and again after one live update, whose
restore sets the saved sregs on new vCPUs.  Records ``firmware.json``.

    python -m tests.lab.guest_firmware
"""

from __future__ import annotations

import shutil
import tempfile
import time
import traceback

from luvmm.lab import guest
from tests.support.helpers import units


def advance(state, name: str, before: dict, timeout: float) -> tuple[dict, float]:
    """Poll the VM's mailbox (guest RAM, another process) until the heartbeat
    and the completed DMA batches both moved past ``before``; bounded."""
    from luvmm.vmm import manage

    start = time.monotonic()
    while True:
        now = manage.status(state, name)["mailbox"]
        if now["heartbeat"] > before["heartbeat"] and now["completed"] > before["completed"]:
            return now, time.monotonic() - start
        if time.monotonic() - start > timeout:
            return now, -1.0
        time.sleep(0.05)  # the guest runs in another process


def main() -> int:
    out: dict = {}
    t0 = time.monotonic()
    state = None
    try:
        from luvmm.liveupdate.emu import hostctl
        from luvmm.liveupdate.state import StateDir
        from luvmm.liveupdate.update import update_once
        from luvmm.liveupdate.emu.client import connect
        from luvmm.vmm import manage
        from luvmm.vmm.kvm import kvm_available
        from luvmm.vmm.config import VmConfig

        out["kvm"] = kvm_available()
        state = StateDir(tempfile.mkdtemp(prefix="lab-fw-"))
        hostctl.start(state, dsa_bandwidth=48 << 20, timeout=300)  # Python under TCG starts slowly
        host = connect(state.socket)
        out["host_up_s"] = time.monotonic() - t0
        st = manage.start(state, VmConfig("lab", memory=64 << 20, guest="firmware"), units(host), wait=300)
        out["vm_up_s"] = time.monotonic() - t0
        out["guest"] = st["config"]["guest"]
        first = st["mailbox"]
        second, waited = advance(state, "lab", first, 120)
        out["mailbox"] = [first, second]
        out["advance_s"] = waited
        record = update_once(state, timeout=300)
        out["update_s"] = time.monotonic() - t0
        report = record["reports"]["lab"]
        out["update"] = {"at_pause": report["mailbox_at_pause"], "after": report["mailbox_after"],
                         "crash": report.get("crash"), "blackout_s": report.get("blackout_s")}
        third, waited = advance(state, "lab", report["mailbox_after"], 120)
        out["mailbox"].append(third)
        out["advance_after_update_s"] = waited
        host.close_connection()
    except Exception as e:  # noqa: BLE001 - recorded for the host-side test
        out["exception"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
    finally:
        if state is not None:
            from luvmm.liveupdate.emu import hostctl

            for log in ("host.log",):
                try:
                    shutil.copy(f"{state.path}/{log}", guest.path(f"firmware-{log}"))
                except OSError:
                    pass
            hostctl.stop(state, timeout=120)
            shutil.rmtree(state.path, ignore_errors=True)
    out["total_s"] = time.monotonic() - t0
    guest.save("firmware.json", out)
    return 1 if "exception" in out else 0


if __name__ == "__main__":
    raise SystemExit(main())
