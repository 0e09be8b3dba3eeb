"""``luvmm lab run``: boot the lab kernel under QEMU with virtme-ng and run a command.

The machine: q35, an intel-iommu with interrupt remapping (``-device
intel-iommu,intremap=on``), one or more of QEMU's ``edu`` PCI devices (a DMA
engine with MSI and INTx) behind it, the host's filesystem as the guest's root
over 9p, and the CPU's virtualization extensions for nested KVM.  QEMU uses
KVM where /dev/kvm can run a full guest (hardware virtualization: kvm_intel or
kvm_amd), else TCG, whose ``max`` CPU emulates AMD SVM for the nested KVM.

The command runs in the guest through :mod:`luvmm.lab.guest` (the stage
runner); results leave the guest through a shared directory (``--rwdir``),
which the host watches to time the boot and each kexec round trip.  Every run
is bounded by a timeout, after which QEMU's whole process group is killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from luvmm.lab import DEFAULT_CPUS, DEFAULT_MEMORY, DEFAULT_TIMEOUT, ROOT, LabError
from luvmm.lab.guest import BOOTS_FILE, EXITS_FILE, KEXEC_FILE, RUN_FILE, _records

#: virtme-ng's exit status when the guest stopped without the command's (a panic, a triple fault...)
VNG_NO_STATUS = 255


def hardware_kvm() -> tuple[bool, str]:
    """Whether /dev/kvm runs full guests (hardware virtualization), and why not."""
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not readable and writable"
    for module in ("kvm_intel", "kvm_amd"):
        if os.path.isdir(f"/sys/module/{module}"):
            return True, module
    if os.path.isdir("/sys/module/kvm_pvm"):
        return False, "/dev/kvm is KVM-PVM (no hardware virtualization: it cannot run a full guest)"
    return False, "/dev/kvm has no hardware virtualization (neither kvm_intel nor kvm_amd)"


class RunResult:
    """What a lab run gave back."""

    def __init__(self, status: int | None, stdout: str, stderr: str, seconds: float, timed_out: bool,
                 boots: list[dict], exits: list[dict], kexecs: list[dict], events: list[tuple[float, str, dict]],
                 shared: str | None, accel: str):
        self.status, self.stdout, self.stderr = status, stdout, stderr
        self.seconds, self.timed_out = seconds, timed_out
        self.boots, self.exits, self.kexecs = boots, exits, kexecs
        #: (seconds since QEMU started, "boot"|"kexec"|"exit", record), as the host saw them appear
        self.events = events
        self.shared = shared
        self.accel = accel

    @property
    def stages(self) -> int:
        return len(self.boots)

    def boot_seconds(self) -> float | None:
        """QEMU started -> the first stage's command started (host clock)."""
        for t, kind, _ in self.events:
            if kind == "boot":
                return t
        return None

    def kexec_round_trips(self) -> list[float]:
        """A kexec asked for in stage N -> stage N+1's command started: the host
        clock from when it saw the kexec record (written once the image is
        loaded) to the next boot record, plus the guest's own time from asking
        to loaded (kexec_file_load verifies and copies the image)."""
        out, pending = [], None
        for t, kind, record in self.events:
            if kind == "kexec":
                pending = t - max(0.0, record.get("loaded", 0.0) - record.get("uptime", 0.0))
            elif kind == "boot" and pending is not None:
                out.append(t - pending)
                pending = None
        return out

    def to_dict(self) -> dict:
        return {"status": self.status, "seconds": round(self.seconds, 2), "timed_out": self.timed_out,
                "accel": self.accel, "stages": self.stages, "boots": self.boots, "exits": self.exits,
                "kexecs": self.kexecs, "boot_seconds": self.boot_seconds(),
                "kexec_round_trips": self.kexec_round_trips()}


def _pump(stream, sink: list[str], tee) -> None:
    for line in iter(stream.readline, ""):
        sink.append(line)
        if tee is not None:
            try:
                tee.write(line)
                tee.flush()
            except (OSError, ValueError):  # `luvmm lab run ... | head`: keep collecting, stop showing
                tee = None
    stream.close()


def _watch(shared: str, start: float, events: list, stop: threading.Event) -> None:
    """Timestamp the guest's records as they appear (the host's clock: the
    guest's restarts at every kexec).  An observer only: nothing waits on it."""
    seen = {BOOTS_FILE: 0, KEXEC_FILE: 0, EXITS_FILE: 0}
    kinds = {BOOTS_FILE: "boot", KEXEC_FILE: "kexec", EXITS_FILE: "exit"}
    while True:
        for name in seen:
            records = _records(os.path.join(shared, name))
            for record in records[seen[name]:]:
                events.append((time.monotonic() - start, kinds[name], record))
            seen[name] = max(seen[name], len(records))
        if stop.wait(0.05):
            return


def run(cmd: list[str] | str, manifest: dict, *, devices: int = 1, memory: str = DEFAULT_MEMORY,
        cpus: int = DEFAULT_CPUS, timeout: float = DEFAULT_TIMEOUT, results: str | None = None,
        accel: str = "auto", console: bool = False, kexec_image: str | None = None,
        append: list[str] | None = None, env: dict | None = None, cwd: str | None = None,
        tee: bool = False) -> RunResult:
    """Boot the lab kernel of ``manifest``, run ``cmd`` in it (again at every
    kexec), return its exit status and output.  ``results``: the shared
    directory, kept (default: a temporary one, removed)."""
    vng = shutil.which("vng")
    if vng is None:
        raise LabError("virtme-ng is not installed: pip install 'luvmm[lab]' (or pip install virtme-ng)")
    if shutil.which("qemu-system-x86_64") is None:
        raise LabError("qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)")
    if shutil.which("kexec") is None:
        raise LabError("kexec is not installed (Debian: apt-get install kexec-tools): the lab's stages need it")
    if devices < 0 or devices > 8:
        raise LabError("--edu must be 0..8")
    if cpus < 1:
        raise LabError("--cpus must be at least 1")
    if accel == "auto":
        accel = "kvm" if hardware_kvm()[0] else "tcg"
    elif accel == "kvm" and not hardware_kvm()[0]:
        raise LabError(f"--accel kvm: {hardware_kvm()[1]}")
    image = manifest["image"]
    kexec_image = os.path.abspath(kexec_image or image)
    for what, p in (("lab kernel", image), ("--kexec-kernel", kexec_image)):
        if not os.path.isfile(p):
            raise LabError(f"{what} {p} does not exist")

    keep = results is not None
    if keep:
        shared = os.path.abspath(results)
        os.makedirs(shared, exist_ok=True)
        for name in os.listdir(shared):
            if name in (RUN_FILE, BOOTS_FILE, EXITS_FILE, KEXEC_FILE) or name.startswith("dmesg-"):
                os.remove(os.path.join(shared, name))
    else:
        shared = tempfile.mkdtemp(prefix="luvmm-lab-")
    host_tmp = tempfile.mkdtemp(prefix="luvmm-lab-host-")  # virtme-ng's own temporary files
    try:
        with open(os.path.join(shared, RUN_FILE), "w") as f:
            json.dump({"cmd": cmd, "cwd": os.path.abspath(cwd or os.getcwd()), "env": env or {},
                       "kexec_image": kexec_image, "selftests": manifest.get("selftests", ""),
                       "root": ROOT, "python": sys.executable}, f, indent=1)
        argv = _vng_argv(vng, image, shared, devices, memory, cpus, accel, console, append)
        return _boot(argv, shared, keep, timeout, tee, accel, host_tmp)
    finally:
        shutil.rmtree(host_tmp, ignore_errors=True)
        if not keep:
            shutil.rmtree(shared, ignore_errors=True)


def _vng_argv(vng: str, image: str, shared: str, devices: int, memory: str, cpus: int, accel: str,
              console: bool, append: list[str] | None) -> list[str]:

    # q35 for the intel-iommu (virtme-ng asks for it only under TCG); with KVM,
    # interrupt remapping needs the split irqchip.
    qemu_opts = ["-machine", "q35" + (",kernel-irqchip=split" if accel == "kvm" else ""),
                 "-device", "intel-iommu,intremap=on"]
    if accel == "kvm":
        qemu_opts += ["-cpu", "host"]
    else:
        # One host thread for all vCPUs: with multi-threaded TCG the guest kernel
        # now and then dies at boot with an int3 Oops in code it is patching
        # (text_poke_bp, e.g. "sched_clock: Marking stable"), as if another vCPU
        # still ran the old translation of the patched bytes.
        qemu_opts += ["-accel", "tcg,thread=single"]
    for i in range(devices):
        # Alone behind a root port: the edu has no FLR or PM reset, a bus reset works.
        qemu_opts += ["-device", f"pcie-root-port,id=lab-rp{i},chassis={i + 1},slot={i + 1}",
                      "-device", f"edu,id=edu{i},bus=lab-rp{i}"]
    # LUO is off unless asked for (kernel/liveupdate/luo_core.c: early_param "liveupdate");
    # KHO too where the tree was not configured with KEXEC_HANDOVER_ENABLE_DEFAULT.
    kernel_args = ["intel_iommu=on", "kho=on", "liveupdate=on"] + list(append or [])
    argv = [vng, "--run", image, "--disable-microvm", "--force-9p", "--user", "root",
            "--memory", memory, "--cpus", str(cpus), "--rwdir", shared, "--cwd", ROOT,
            "--exec", f"{sys.executable} -S -E -m luvmm.lab.guest {shared}"]
    if accel == "tcg":
        argv.append("--disable-kvm")
    if console:
        argv.append("--verbose")
    for a in kernel_args:
        argv += ["--append", a]
    argv += ["--qemu-opts=" + " ".join(qemu_opts)]
    return argv


def _boot(argv: list[str], shared: str, keep: bool, timeout: float, tee: bool, accel: str,
          host_tmp: str) -> RunResult:
    start = time.monotonic()
    out: list[str] = []
    err: list[str] = []
    events: list = []
    stop = threading.Event()
    timed_out = False
    status: int | None = None
    proc = None
    threads: list[threading.Thread] = []
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace", start_new_session=True, cwd=ROOT,
                                env=dict(os.environ, TMPDIR=host_tmp))
        threads = [threading.Thread(target=_pump, args=(proc.stdout, out, sys.stdout if tee else None), daemon=True),
                   threading.Thread(target=_pump, args=(proc.stderr, err, sys.stderr if tee else None), daemon=True),
                   threading.Thread(target=_watch, args=(shared, start, events, stop), daemon=True)]
        for t in threads:
            t.start()
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
    finally:
        if proc is not None and proc.returncode is None:
            _kill_group(proc)
        stop.set()
        for t in threads:
            t.join(timeout=5)
    seconds = time.monotonic() - start
    return RunResult(None if timed_out else status, "".join(out), "".join(err), seconds, timed_out,
                     _records(os.path.join(shared, BOOTS_FILE)), _records(os.path.join(shared, EXITS_FILE)),
                     _records(os.path.join(shared, KEXEC_FILE)), events, shared if keep else None, accel)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL virtme-ng's process group: QEMU is in it, and neither keeps
    anything worth a clean shutdown (virtme-ng's temporary files are in a
    directory of ours, removed after)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    proc.wait()
