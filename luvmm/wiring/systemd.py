"""The units of a real host, as systemd unit files: what `luvmm host install`
writes to /etc/systemd/system, generated here and only here.

* ``luvmm-agent.service``: the LUO agent (``luvmm.wiring.agent``).
* ``luvmm-vm@.service``: one VMM per VM (``luvmm.vmm.process``), the instance
  being the VM's name -- ``luvmm-vm@NAME.service`` is the unit the emulated
  host calls ``vm-NAME``, and the cgroup :meth:`luvmm.services.SystemdUnits.unit_of`
  reads back from ``/proc/PID/cgroup`` (the agent authorizes by it).
* ``luvmm.target``: what a boot -- a cold one or a kexec -- starts; the
  agent's and each VM's instance are enabled into it (WantedBy=).

They run what the emulated host's init runs: ``python -S -c "..."``
(luvmm.liveupdate.state.python_unit: this interpreter, the repo and its
site-packages appended to sys.path, no site initialisation, no runpy, the
cyclic GC off until the restore path is done), with ``--host real
--state-dir /var/lib/luvmm``.

**The policy is luvmm's own init's** (luvmm.liveupdate.init):
Restart=on-failure, except after EX_CONFIG (78: what the unit was asked to
run cannot run -- a VM that cannot start is not restarted in a loop);
luvmm's units are never given up on (StartLimitBurst=0), restarted after a
delay that doubles from 50 ms to RESTART_MAX_DELAY_S (RestartSteps=,
RestartMaxDelaySec=: systemd 254 and later; an older systemd, such as
Debian 12's 252, gets a fixed RestartSec= instead, see :func:`unit_files`);
KillMode=control-group, and 5 s between SIGTERM and SIGKILL at a stop.

**The fd store.**  A VMM leaves its VM's files (RAM memfd, iommufd, VFIO
device, and their ``meta``) in its unit's store with sd_notify
``FDSTORE=1`` (luvmm.liveupdate.fdstore), which systemd takes only from a unit with
FileDescriptorStoreMax= > 0 and NotifyAccess= other than none (``main``:
the VMM sends from its own process).  systemd passes the store back to the
unit's next process (LISTEN_FDS) when it restarts it after a failure, and
flushes it when the unit is stopped -- FileDescriptorStorePreserve=restart,
systemd's default, written out where systemd knows the setting.  Not
``yes``: that would keep a stopped VM's RAM and device open in pid 1 and
hand them to the next VM of that name, where the emulated init flushes them.

**A VM's metrics port** is a socket unit of its own, as luvmm's init
holds a unit's ``sockets`` (luvmm.liveupdate.init): ``luvmm-vm@NAME.socket``
(:func:`vm_socket_files`: ListenStream=ADDRESS:PORT, Accept=no,
FileDescriptorName=metrics, Service=luvmm-vm@NAME.service), which the
template names in ``Sockets=luvmm-vm@%i.socket``.  Sockets= is Wants= and
After= of it: systemd binds the port before it starts the VMM, passes it
(LISTEN_FDNAMES ``metrics``, before the fd store's files:
luvmm.liveupdate.fdstore.SOCKETS) to every process it starts for the VM, and
keeps it bound while the VMM restarts -- so no process of the VM ever binds
the port, and there is no moment between two of them when a local user
could (and serve Prometheus figures of his own).  After a kexec the new
systemd binds it before it starts the VMM.  A VM without a metrics port
has no such unit, and Wants= of a unit that does not exist is nothing.
Wants=, not Requires=: a port that cannot be bound at a boot must not
keep the VM down -- its VMM binds the port itself, or says why it cannot
(`vm start` fails; `luvmm update` reports it).  The socket unit is
DefaultDependencies=no, as the VMM's (a restore does not wait for
sysinit.target); FreeBind=yes, as systemd.socket(5) advises for an IP
address, which may not be up that early; BindIPv6Only=ipv6-only, as the
VMM's own bind; no trigger limit (connections while the VMM restarts never
put it into failure, which would close it); StopWhenUnneeded=yes: closed
once the VM's service is stopped (`luvmm vm stop`) or has failed for good,
never at its restarts (a service waiting to restart is activating).
:func:`install_vm_sockets` writes it, :func:`remove_vm_sockets` removes it.

**How a unit knows how it was started.**  The emulated init says it in
``LUVMM_BOOT``; systemd says nothing of the kind, so on a real host the
unit finds out (:func:`luvmm.liveupdate.state.unit_boot`): ``restart`` when its
fd store was passed to it, or when it already ran in this boot (a marker
in ``$RUNTIME_DIRECTORY``, /run/luvmm: a tmpfs no boot inherits); else --
its first start since the kernel booted -- ``kexec``, meaning *look for
what the previous kernel handed over*: the VMM asks the agent for its
incoming LUO session and boots its VM cold when there is none (a cold
boot), and the agent resumes an update its record on disk says was in its
kexec.  A machine power-cycled in the middle of an update's kexec call is
the one case this cannot tell from a kexec: its VMs find no session and
boot cold.

**Ordering.**  After a kexec the blackout lasts until each VMM has its
guest running again, so the VMMs start first and early:
DefaultDependencies=no (not after sysinit.target and basic.target, seconds
into a boot), only after local-fs.target (the state dir, the Python tree)
and systemd-modules-load.service (/dev/kvm, /dev/vfio, /dev/iommu can come
from modules), and Before=luvmm-agent.service: the agent's interpreter
starts after theirs, and during the boot (StartupCPUWeight=) it has a
fifth of a VMM's CPU weight, so its slower start-up does not take a core
from a VMM rebuilding its VM (luvmm.liveupdate.agent.Agent.fast_restore spares
its own imports for the same reason).  A VMM waits for the agent anyway
(luvmm.liveupdate.agent_client.wait_for_agent), so starting before it costs
nothing.  The agent is DefaultDependencies=no too: restoring VMMs wait for it.

**Where things live.**  The state -- the VMs' definitions, the agent's
update record, the compiled bytecode -- in /var/lib/luvmm
(StateDirectory=, 0700): on disk, so it outlives a kexec, as it must.  The
per-boot markers in /run/luvmm (RuntimeDirectory=, 0700,
RuntimeDirectoryPreserve=yes: kept while the units restart), and so are the
agent's and the VMMs' sockets (luvmm.liveupdate.state.StateDir puts them in
``$RUNTIME_DIRECTORY``): a socket is a thing of one boot.

Not on the restore path: only `luvmm host install` imports this module.
"""

from __future__ import annotations

import math
import os

from luvmm.liveupdate.state import GUEST_CPUS_ENV, RESTART_MAX_DELAY_S, python_unit

AGENT_UNIT = "luvmm-agent.service"
VM_PREFIX = "luvmm-vm@"
VM_TEMPLATE = "luvmm-vm@.service"
TARGET = "luvmm.target"
STATE_DIR = "/var/lib/luvmm"
RUNTIME_DIR = "/run/luvmm"
UNIT_DIR = "etc/systemd/system"
#: EX_CONFIG (sysexits.h): a unit that exits so is not restarted (luvmm.liveupdate.init, luvmm.vmm.process).
EX_CONFIG = 78
#: A VM unit's FileDescriptorStoreMax= (luvmm.vmm.manage.FDSTORE_MAX: its files and their meta, with room to spare).
FDSTORE_MAX = 8
#: The first restart's delay; each next one doubles it, up to RESTART_MAX_DELAY_S.
RESTART_FIRST_DELAY_S = 0.05
#: The delay where RestartSteps= is unknown (systemd < 254): one delay for every restart, long
#: enough that a unit failing for good (it is never given up on) does not spin.
RESTART_FIXED_DELAY_S = RESTART_MAX_DELAY_S / 8
#: The first systemd with RestartSteps=, RestartMaxDelaySec= and FileDescriptorStorePreserve=.
SYSTEMD_RESTART_STEPS = 254
#: The agent's StartupCPUWeight= (a VMM has systemd's default, 100).
AGENT_STARTUP_CPU_WEIGHT = 20
STOP_TIMEOUT_S = 5  # luvmm.liveupdate.init.Init.stop_unit: SIGTERM, then SIGKILL after 5 s
_INSTANCE = "@LUVMM-INSTANCE@"  # stands for %i until the ExecStart line is quoted


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def quote(arg: str) -> str:
    """One word of an ExecStart= line: double-quoted with C escapes, ``%`` and
    ``$`` doubled (else systemd reads a specifier or a variable)."""
    text = arg.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    text = text.replace("%", "%%").replace("$", "$$")
    if text and not any(c in text for c in " \t\"'\\;") and text == arg:
        return text
    return f'"{text}"'


def exec_start(argv: list[str]) -> str:
    return " ".join(quote(a) for a in argv).replace(_INSTANCE, "%i")


def _restart(systemd: int | None) -> list[str]:
    lines = ["Restart=on-failure",
             f"RestartPreventExitStatus={EX_CONFIG}"]
    if systemd is None or systemd >= SYSTEMD_RESTART_STEPS:
        steps = math.ceil(math.log2(RESTART_MAX_DELAY_S / RESTART_FIRST_DELAY_S))
        lines += [f"# Restarted after {_ms(RESTART_FIRST_DELAY_S)}, then ever more slowly (doubling) up to "
                  f"{_ms(RESTART_MAX_DELAY_S)}.",
                  f"RestartSec={_ms(RESTART_FIRST_DELAY_S)}",
                  f"RestartSteps={steps}",
                  f"RestartMaxDelaySec={_ms(RESTART_MAX_DELAY_S)}"]
    else:
        lines += [f"# systemd {systemd} has no RestartSteps= (254): one delay for every restart.",
                  f"RestartSec={_ms(RESTART_FIXED_DELAY_S)}"]
    return lines + ["KillMode=control-group",
                    f"TimeoutStopSec={STOP_TIMEOUT_S}s"]


def _common_unit() -> list[str]:
    return ["# Never given up on, however often it fails (as on the emulated host): a host cannot do without it.",
            "StartLimitIntervalSec=0",
            "StartLimitBurst=0",
            "# Early: after a kexec the VMs' blackout lasts until their VMMs run them again.",
            "DefaultDependencies=no",
            "After=local-fs.target systemd-modules-load.service",
            "Conflicts=shutdown.target",
            "Before=shutdown.target"]


def _dirs(state_dir: str) -> list[str]:
    return [f"Environment=PYTHONPYCACHEPREFIX={state_dir}/pycache",
            "# The state (VM definitions, the update record) outlives a kexec: it is on disk.",
            "StateDirectory=luvmm",
            "StateDirectoryMode=0700",
            "# Per-boot markers (a tmpfs: no boot inherits them), kept while the units restart.",
            "RuntimeDirectory=luvmm",
            "RuntimeDirectoryMode=0700",
            "RuntimeDirectoryPreserve=yes",
            "# VFIO and iommufd pin guest RAM.",
            "LimitMEMLOCK=infinity"]


def unit_files(systemd: int | None = None, guest_cpus: str | None = None) -> dict[str, str]:
    """{file name: text} of the units, for ``systemd`` (its version; None: a
    current one).  Directives that version does not know are left out rather
    than warned about at every load.  ``guest_cpus``: the CPUs set apart for
    the vCPUs (luvmm.liveupdate.state.GUEST_CPUS_ENV), in both units' environment."""
    cpus = [f"Environment={GUEST_CPUS_ENV}={guest_cpus}"] if guest_cpus else []
    agent_argv, _ = python_unit("luvmm.wiring.agent", "--host", "real", "--state-dir", STATE_DIR)
    vm_argv, _ = python_unit("luvmm.vmm.process", "--host", "real", "--state-dir", STATE_DIR, "--name", _INSTANCE)
    new = systemd is None or systemd >= SYSTEMD_RESTART_STEPS
    header = ["# Written by `luvmm host install` (luvmm/wiring/systemd.py): install it again rather than edit it."]

    target = header + [
        "[Unit]",
        "Description=luvmm: the LUO agent and the VMs it keeps across a kexec",
        f"Wants={AGENT_UNIT}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    agent = header + [
        "[Unit]",
        "Description=luvmm LUO agent (holds the VMs' sessions across a kexec)",
        f"PartOf={TARGET}",
    ] + _common_unit() + [
        "",
        "[Service]",
        "Type=exec",
        f"ExecStart={exec_start(agent_argv)}",
        "Environment=LUVMM_UNIT=agent",
    ] + cpus + _restart(systemd) + [
        "# Its start-up must not take CPU from the VMMs restoring their VMs after a kexec.",
        f"StartupCPUWeight={AGENT_STARTUP_CPU_WEIGHT}",
    ] + _dirs(STATE_DIR) + [
        "",
        "[Install]",
        f"WantedBy={TARGET}",
        f"Also={TARGET}",
    ]
    vm = header + [
        "[Unit]",
        "Description=luvmm VMM of VM %i",
        "# The agent starts after the VMMs: a VMM waits for it, and after a kexec its restore comes first.",
        f"Wants={AGENT_UNIT}",
        f"Before={AGENT_UNIT}",
        f"PartOf={TARGET}",
    ] + _common_unit() + [
        "",
        "[Service]",
        "# Not notify: the agent (After= this) would wait for a VMM that waits for the agent.",
        "Type=exec",
        f"ExecStart={exec_start(vm_argv)}",
        "Environment=LUVMM_UNIT=vm-%i",
    ] + cpus + _restart(systemd) + [
        "# The VM's files (RAM, iommufd, device) stay with systemd while the VMM restarts (liveupdate/fdstore.py).",
        f"FileDescriptorStoreMax={FDSTORE_MAX}",
        "NotifyAccess=main",
        "# Its metrics port, where it has one: bound and kept by systemd (Wants= and After= it; see vm_socket_files).",
        f"Sockets={VM_PREFIX}%i.socket",
    ] + (["# Flushed when the unit stops (not =yes: a stopped VM's RAM and device would stay open in pid 1).",
          "FileDescriptorStorePreserve=restart"] if new else []) + _dirs(STATE_DIR) + [
        "",
        "[Install]",
        f"WantedBy={TARGET}",
    ]
    return {TARGET: "\n".join(target) + "\n", AGENT_UNIT: "\n".join(agent) + "\n",
            VM_TEMPLATE: "\n".join(vm) + "\n"}


def _listen_stream(spec: str) -> str:
    """A unit socket's ``listen`` (luvmm.names.parse_listen: PORT is
    loopback) as ListenStream= takes it: ``ADDRESS:PORT``, ``[ADDRESS]:PORT``
    -- never a port alone, which systemd reads as every address -- with
    ``%`` doubled (an IPv6 scope is not a specifier)."""
    from luvmm.names import parse_listen

    address, port = parse_listen(spec)
    where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    return where.replace("%", "%%")


def vm_socket_files(name: str, sockets: list[dict]) -> dict[str, str]:
    """{file name: text} of VM ``name``'s socket unit, for its unit's
    ``sockets`` (``[{"name": "metrics", "listen": "127.0.0.1:9100"}]``: what
    `luvmm vm start` writes); {} when it has none.  ValueError for a name
    or an address systemd would not take."""
    from luvmm.names import check_vm_name

    check_vm_name(name)
    if not sockets:
        return {}
    service = f"{VM_PREFIX}{name}.service"
    header = ["# Written by luvmm for VM " + name + " (luvmm/wiring/systemd.py): removed with the VM."]
    text = header + [
        "[Unit]",
        f"Description=luvmm VM {name}'s sockets (bound by systemd across its VMM's restarts and live updates)",
        "# Early, as its VMM: after a kexec the VM's restore does not wait for sysinit.target.",
        "DefaultDependencies=no",
        "Conflicts=shutdown.target",
        "Before=shutdown.target",
        "# Closed once the VM's service is stopped or has failed for good, never while it restarts.",
        "StopWhenUnneeded=yes",
        "",
        "[Socket]",
    ]
    names = set()
    for spec in sockets:
        fdname = str(spec["name"])
        if not fdname or ":" in fdname or not fdname.isprintable() or len(fdname) > 255 or fdname in names:
            raise ValueError(f"VM {name}: bad socket name {fdname!r}")
        names.add(fdname)
        text += [f"ListenStream={_listen_stream(spec['listen'])}"]
    if len(names) != 1:  # FileDescriptorName= names every socket of a unit: one name, one unit
        raise ValueError(f"VM {name}: one socket name per socket unit, not {sorted(names)}")
    text += [
        f"FileDescriptorName={names.pop()}",
        "Accept=no",
        f"Service={service}",
        "# An address not up yet at boot (an interface's) can be bound all the same.",
        "FreeBind=yes",
        "BindIPv6Only=ipv6-only",
        "# Connections while the VMM restarts must never put the socket into failure (closed: the port free).",
        "TriggerLimitIntervalSec=0",
    ]
    return {f"{VM_PREFIX}{name}.socket": "\n".join(text) + "\n"}


def install_vm_sockets(name: str, sockets: list[dict], root: str = "/") -> list[str]:
    """Write VM ``name``'s socket unit (:func:`vm_socket_files`) under
    ROOT/etc/systemd/system, whole or not at all, before its service is
    enabled and started (systemctl enable reloads systemd's units).  Returns
    the paths written ([] for a VM without sockets)."""
    files = vm_socket_files(name, sockets)
    return install(files, root) if files else []


def remove_vm_sockets(name: str, root: str = "/") -> bool:
    """Remove VM ``name``'s socket unit, once its service is stopped and
    disabled (systemd closed the socket then: StopWhenUnneeded=).  True if
    there was one."""
    from luvmm.names import check_vm_name

    check_vm_name(name)
    try:
        os.unlink(os.path.join(root, UNIT_DIR, f"{VM_PREFIX}{name}.socket"))
    except FileNotFoundError:
        return False
    return True


def systemd_version(systemctl: str = "systemctl") -> int | None:
    """The version `systemctl --version` reports, or None (no systemctl, or not understood)."""
    import subprocess

    try:
        out = subprocess.run([systemctl, "--version"], capture_output=True, text=True, timeout=10).stdout
        return int(out.split()[1])
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None


def install(files: dict[str, str], root: str = "/") -> list[str]:
    """Write ``files`` to ROOT/etc/systemd/system (made if missing), each
    whole or not at all: all are written beside their place first, then
    renamed over it; on a failure nothing new is left (neither a file nor a
    directory made for them).  Returns the paths written."""
    target = os.path.join(root, UNIT_DIR)
    made = []
    path = target
    while not os.path.isdir(path):
        made.append(path)
        path = os.path.dirname(path)
    temps: dict[str, str] = {}
    try:
        for d in reversed(made):
            os.mkdir(d, 0o755)
        for name, text in files.items():
            final = os.path.join(target, name)
            tmp = os.path.join(target, f".{name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            temps[tmp] = final
            try:
                data = memoryview(text.encode())
                while data:
                    data = data[os.write(fd, data):]
                os.fchmod(fd, 0o644)  # whatever the umask
                os.fsync(fd)
            finally:
                os.close(fd)
        for tmp, final in temps.items():
            os.replace(tmp, final)
    except BaseException:
        for tmp in temps:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        for d in made:
            try:
                os.rmdir(d)
            except OSError:
                pass
        raise
    return list(temps.values())
